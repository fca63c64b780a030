//! The socket kube-apiserver dials for a kms provider's `endpoint`, found
//! exactly as the apiserver finds it.
//!
//! The apiserver (`k8s.io/kms/pkg/util.ParseEndpoint`, called by
//! `kmsv2.NewGRPCService`) parses the endpoint with Go's `net/url.Parse`,
//! requires the scheme `unix`, and dials the URL's *path*: a leading `/@`
//! becomes a Linux abstract socket `@…`. Whatever stands between `unix://`
//! and the next `/` is the URL's host, and is dropped:
//!
//! | endpoint                    | the apiserver dials                    |
//! |-----------------------------|----------------------------------------|
//! | `unix:///var/run/kms.sock`  | `/var/run/kms.sock`                    |
//! | `unix:/var/run/kms.sock`    | `/var/run/kms.sock`                    |
//! | `unix://kekd-dev/kms.sock`  | `/kms.sock` (`kekd-dev` is the host)   |
//! | `unix://kms.sock`           | an empty path (`kms.sock` is the host) |
//! | `unix:kms.sock`             | an empty path (an opaque URL)          |
//!
//! [`parse_endpoint`] is a port of `ParseEndpoint` and of the parts of
//! `net/url.Parse` it reaches (Go 1.26). The table in
//! `tests/conformance/testdata/endpoints.json` is checked against the real
//! Go function by the conformance suite and against this one by a unit test.

use std::ffi::OsStr;
use std::net::Ipv6Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the apiserver makes of a kms provider's `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// What `ParseEndpoint` returns, byte for byte: the name the apiserver
    /// passes to `net.DialUnix`. Empty, an absolute path, or `@…` (abstract).
    address: Vec<u8>,
    /// The URL's authority as written (`kekd-dev` in
    /// `unix://kekd-dev/kms.sock`), when not empty: the apiserver ignores it.
    pub authority: Option<String>,
    /// The rest of `unix:rest` when it does not start with `/` (an opaque
    /// URL, which has no path): the apiserver ignores it.
    pub opaque: Option<String>,
}

/// Where the apiserver's dial goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial<'a> {
    /// A socket file at this absolute path.
    Path(&'a Path),
    /// A Linux abstract socket (the name, with its leading `@`).
    Abstract(&'a OsStr),
    /// Nothing: the path is empty, so every dial fails.
    Empty,
}

/// Why the apiserver refuses an endpoint (it then refuses the whole
/// EncryptionConfiguration). The messages follow the apiserver's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `endpoint: ""`.
    #[error("remote KMS provider can't use empty string as endpoint")]
    Empty,
    /// Go's `url.Parse` fails.
    #[error(
        "invalid endpoint {endpoint:?} for remote KMS provider, error: parse {url:?}: {reason}"
    )]
    Url {
        /// The endpoint.
        endpoint: String,
        /// The part Go's error names (the endpoint, or the part before `#`).
        url: String,
        /// Go's reason.
        reason: String,
    },
    /// A scheme other than `unix`.
    #[error("unsupported scheme {0:?} for remote KMS provider")]
    Scheme(String),
}

impl Endpoint {
    /// The name the apiserver dials, as `ParseEndpoint` returns it.
    pub fn address(&self) -> &OsStr {
        OsStr::from_bytes(&self.address)
    }

    /// Where the apiserver's dial goes.
    pub fn dial(&self) -> Dial<'_> {
        match self.address.first() {
            None => Dial::Empty,
            Some(b'@') => Dial::Abstract(self.address()),
            Some(_) => Dial::Path(Path::new(self.address())),
        }
    }
}

/// Parses a kms provider's `endpoint` exactly as kube-apiserver does.
///
/// # Errors
/// The apiserver refuses the endpoint: empty, not a URL Go accepts, or a
/// scheme other than `unix`.
pub fn parse_endpoint(endpoint: &str) -> Result<Endpoint, EndpointError> {
    if endpoint.is_empty() {
        return Err(EndpointError::Empty);
    }
    let url = go_url_parse(endpoint).map_err(|(url, reason)| EndpointError::Url {
        endpoint: endpoint.to_owned(),
        url: url.to_owned(),
        reason,
    })?;
    if url.scheme != "unix" {
        return Err(EndpointError::Scheme(url.scheme));
    }
    let mut address = url.path;
    // Linux abstract namespace: `/@name` dials `@name`.
    if address.starts_with(b"/@") {
        address.remove(0);
    }
    Ok(Endpoint {
        address,
        authority: url.authority.filter(|a| !a.is_empty()),
        opaque: url.opaque,
    })
}

/// The parts of a Go `url.URL` that `ParseEndpoint` reads.
struct GoUrl {
    /// Lower-cased.
    scheme: String,
    /// Unescaped.
    path: Vec<u8>,
    authority: Option<String>,
    opaque: Option<String>,
}

/// Go's `url.Parse`: on failure, the string Go's error quotes and the
/// reason.
fn go_url_parse(raw: &str) -> Result<GoUrl, (&str, String)> {
    let (before, fragment) = match raw.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (raw, None),
    };
    let url = parse(before).map_err(|e| (before, e))?;
    if let Some(f) = fragment.filter(|f| !f.is_empty()) {
        unescape(f, Mode::Other).map_err(|e| (raw, e))?;
    }
    Ok(url)
}

/// Go's `url.parse(rawURL, viaRequest=false)`.
fn parse(raw: &str) -> Result<GoUrl, String> {
    if raw.bytes().any(|b| b < b' ' || b == 0x7f) {
        return Err("net/url: invalid control character in URL".to_owned());
    }
    let mut url = GoUrl {
        scheme: String::new(),
        path: Vec::new(),
        authority: None,
        opaque: None,
    };
    if raw == "*" {
        url.path = b"*".to_vec();
        return Ok(url);
    }
    let (scheme, rest) = scheme(raw)?;
    url.scheme = scheme.to_ascii_lowercase();
    // Go strips a lone trailing `?` (ForceQuery) or cuts at the first `?`:
    // either way the rest ends before the first `?`.
    let mut rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    if !rest.starts_with('/') {
        if !url.scheme.is_empty() {
            url.opaque = Some(rest.to_owned());
            return Ok(url);
        }
        let segment = rest.split_once('/').map_or(rest, |(s, _)| s);
        if segment.contains(':') {
            return Err("first path segment in URL cannot contain colon".to_owned());
        }
    }
    if (!url.scheme.is_empty() || !rest.starts_with("///")) && rest.starts_with("//") {
        let (authority, path) = match rest[2..].find('/') {
            Some(i) => rest[2..].split_at(i),
            None => (&rest[2..], ""),
        };
        parse_authority(authority)?;
        url.authority = Some(authority.to_owned());
        rest = path;
    }
    url.path = unescape(rest, Mode::Other)?;
    Ok(url)
}

/// Go's `getScheme`: `scheme:rest`, or no scheme.
fn scheme(raw: &str) -> Result<(&str, &str), String> {
    for (i, c) in raw.bytes().enumerate() {
        match c {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' if i > 0 => {}
            b':' if i == 0 => return Err("missing protocol scheme".to_owned()),
            b':' => return Ok((&raw[..i], &raw[i + 1..])),
            _ => return Ok(("", raw)),
        }
    }
    Ok(("", raw))
}

/// Go's `parseAuthority`: `userinfo@host`; only its validity matters here.
fn parse_authority(authority: &str) -> Result<(), String> {
    let Some(at) = authority.rfind('@') else {
        return parse_host(authority);
    };
    parse_host(&authority[at + 1..])?;
    let userinfo = &authority[..at];
    let valid = userinfo.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '-' | '.'
                    | '_'
                    | ':'
                    | '~'
                    | '!'
                    | '$'
                    | '&'
                    | '\''
                    | '('
                    | ')'
                    | '*'
                    | '+'
                    | ','
                    | ';'
                    | '='
                    | '%'
                    | '@'
            )
    });
    if !valid {
        return Err("net/url: invalid userinfo".to_owned());
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    unescape(user, Mode::Other)?;
    unescape(password, Mode::Other)?;
    Ok(())
}

/// Go's `parseHost` for a scheme other than http(s): `host[:port]`.
fn parse_host(host: &str) -> Result<(), String> {
    match host.rfind('[') {
        Some(i) if i > 0 => Err("invalid IP-literal".to_owned()),
        Some(_) => {
            let close = host
                .rfind(']')
                .ok_or_else(|| "missing ']' in host".to_owned())?;
            let colon_port = &host[close + 1..];
            if !valid_optional_port(colon_port) {
                return Err(format!("invalid port {colon_port:?} after host"));
            }
            unescape(colon_port, Mode::Host)?;
            let hostname = &host[1..close];
            let mut unescaped = match hostname.find("%25") {
                Some(zone) => {
                    let mut h = unescape(&hostname[..zone], Mode::Host)?;
                    h.extend(unescape(&hostname[zone..], Mode::Zone)?);
                    h
                }
                None => unescape(hostname, Mode::Host)?,
            };
            // netip.ParseAddr, then not IPv4: an IPv6 address, with an
            // optional non-empty zone after `%`.
            let is_v6 = unescaped
                .iter()
                .find(|b| matches!(b, b'.' | b':' | b'%'))
                .is_some_and(|b| *b == b':');
            let zone = unescaped.iter().position(|b| *b == b'%');
            let zone_ok = zone.is_none_or(|z| z + 1 < unescaped.len());
            unescaped.truncate(zone.unwrap_or(unescaped.len()));
            let addr_ok =
                std::str::from_utf8(&unescaped).is_ok_and(|a| a.parse::<Ipv6Addr>().is_ok());
            if is_v6 && zone_ok && addr_ok {
                Ok(())
            } else {
                Err("invalid host: ParseAddr: not an IPv6 literal".to_owned())
            }
        }
        None => {
            if let Some(i) = host.rfind(':') {
                let colon_port = &host[i..];
                if !valid_optional_port(colon_port) {
                    return Err(format!("invalid port {colon_port:?} after host"));
                }
            }
            unescape(host, Mode::Host).map(drop)
        }
    }
}

/// Go's `validOptionalPort`: empty, or `:` and digits.
fn valid_optional_port(port: &str) -> bool {
    port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// Which of Go's unescape modes: host and zone restrict what may appear;
/// the others (path, userinfo, fragment) only check each `%XX`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Host,
    Zone,
    Other,
}

/// Go's `unescape`, for the modes `url.Parse` uses (`+` stays `+`).
fn unescape(s: &str, mode: Mode) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                let end = bytes.len().min(i + 3);
                return Err(escape_error(&bytes[i..end]));
            };
            let v = hi << 4 | lo;
            let is_25 = &bytes[i..i + 3] == b"%25";
            // A host may %-encode only non-ASCII bytes (and `%25`).
            if mode == Mode::Host && hi < 8 && !is_25 {
                return Err(escape_error(&bytes[i..i + 3]));
            }
            if mode == Mode::Zone && !is_25 && v != b' ' && !host_byte(v) {
                return Err(escape_error(&bytes[i..i + 3]));
            }
            out.push(v);
            i += 3;
        } else {
            if matches!(mode, Mode::Host | Mode::Zone) && c < 0x80 && !host_byte(c) {
                return Err(format!(
                    "invalid character {:?} in host name",
                    char::from(c).to_string()
                ));
            }
            out.push(c);
            i += 1;
        }
    }
    Ok(out)
}

fn escape_error(bytes: &[u8]) -> String {
    format!("invalid URL escape {:?}", String::from_utf8_lossy(bytes))
}

fn hex(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// An ASCII byte Go leaves unescaped in a host (`shouldEscape(c,
/// encodeHost)` is false).
fn host_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=:[]<>\"".contains(&c)
}

#[cfg(test)]
mod tests;
