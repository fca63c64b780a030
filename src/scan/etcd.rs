//! Reading a prefix of etcd page by page, read-only, at one revision.
//!
//! The first request counts the keys under the prefix (`count_only`) and
//! fixes the revision; every page is then a Range request at that
//! revision, `limit` keys from just after the last key of the page before.
//! So the pages together are one consistent snapshot, even while the
//! apiserver keeps writing, and only one page is in memory at a time. A
//! page larger than the gRPC message limit is asked for again with half
//! as many keys. Reads are linearizable unless `serializable` is set (then
//! the member asked answers from its own copy, which may lag the leader).

use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

/// Largest page response accepted (values are at most 1.5 MiB each by
/// etcd's default request limit).
pub const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where etcd is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct EtcdTarget {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one or more.
    pub endpoints: Vec<String>,
    /// The CA that signed etcd's serving certificate (PEM).
    pub cacert: Option<PathBuf>,
    /// Our client certificate and its key (PEM), when etcd requires one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// How one scan reads.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    /// Keys per page to start with.
    pub page_size: u32,
    /// Serializable (member-local) instead of linearizable reads.
    pub serializable: bool,
}

/// Progress after each page.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Keys read so far.
    pub keys: u64,
    /// Keys under the prefix at the scan's revision.
    pub expected: u64,
    /// Pages read so far.
    pub pages: u64,
}

/// What the paging itself observed.
#[derive(Debug, Clone, Copy)]
pub struct Paged {
    /// The revision every page was read at.
    pub revision: i64,
    /// Keys counted at that revision before paging.
    pub expected: u64,
    /// Pages read.
    pub pages: u64,
    /// Keys read.
    pub keys: u64,
    /// Page size at the end (halved on oversized pages).
    pub final_page_size: u32,
}

/// Why a scan could not read etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file cannot be read.
    #[error("cannot read {flag} {path}: {error}")]
    File {
        /// The flag naming it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The endpoints or TLS flags do not fit together.
    #[error("{0}")]
    Usage(String),
    /// etcd did not answer, or refused.
    #[error("etcd at {endpoints}: {detail}{hint}")]
    Request {
        /// The endpoints.
        endpoints: String,
        /// The client's error with its causes.
        detail: String,
        /// What to check, when the cause is recognised.
        hint: String,
    },
    /// The revision was compacted while paging.
    #[error(
        "etcd compacted revision {revision} while the scan was reading it: run the scan again (a smaller prefix or a larger --page-size finishes sooner)"
    )]
    Compacted {
        /// The scan's revision.
        revision: i64,
    },
    /// etcd returned fewer or more keys than it counted at the same revision.
    #[error(
        "etcd counted {expected} keys under the prefix at revision {revision} but the pages held {keys}"
    )]
    Inconsistent {
        /// The revision.
        revision: i64,
        /// Counted.
        expected: u64,
        /// Read.
        keys: u64,
    },
}

impl EtcdTarget {
    fn options(&self) -> Result<ConnectOptions, EtcdError> {
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        for e in &self.endpoints {
            if !e.starts_with("http://") && !e.starts_with("https://") {
                return Err(EtcdError::Usage(format!(
                    "--etcd-endpoints {e:?}: write the URL with its scheme, e.g. https://127.0.0.1:2379 \
                     (the apiserver's --etcd-servers)"
                )));
            }
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout);
        let tls_flags = self.cacert.is_some() || self.client_cert.is_some();
        match (https, tls_flags) {
            (0, false) => return Ok(options),
            (0, true) => {
                return Err(EtcdError::Usage(
                    "--cacert/--cert/--key are for https:// endpoints; --etcd-endpoints lists only http:// ones"
                        .to_owned(),
                ));
            }
            (n, _) if n != self.endpoints.len() => {
                return Err(EtcdError::Usage(
                    "--etcd-endpoints mixes http:// and https://: list the endpoints of one scheme"
                        .to_owned(),
                ));
            }
            _ => {}
        }
        let Some(cacert) = &self.cacert else {
            return Err(EtcdError::Usage(
                "https:// endpoints need --cacert FILE, the CA of etcd's serving certificate \
                 (kubeadm: /etc/kubernetes/pki/etcd/ca.crt)"
                    .to_owned(),
            ));
        };
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read("--cacert", cacert)?));
        if let Some((cert, key)) = &self.client_cert {
            let cert = read("--cert", cert)?;
            let key = zeroize::Zeroizing::new(read("--key", key)?);
            tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
        }
        options = options.with_tls(tls);
        Ok(options)
    }

    /// Reads every key under `prefix` at one revision, page by page,
    /// calling `each(key, value)` for every pair and `progress` after every
    /// page. Nothing is written.
    ///
    /// # Errors
    /// [`EtcdError`] naming the endpoint, the cause and what to check.
    pub async fn scan(
        &self,
        prefix: &[u8],
        paging: Paging,
        mut each: impl FnMut(&[u8], &[u8]),
        mut progress: impl FnMut(Progress),
    ) -> Result<Paged, EtcdError> {
        let options = self.options()?;
        let client = Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|e| self.request_error(&e))?;
        let mut kv = client.kv_client().max_decoding_message_size(MAX_PAGE_BYTES);
        let end = range_end(prefix);
        let consistency = |o: GetOptions| {
            if paging.serializable {
                o.with_serializable()
            } else {
                o
            }
        };

        let counted = kv
            .get(
                prefix,
                Some(consistency(
                    GetOptions::new().with_range(end.clone()).with_count_only(),
                )),
            )
            .await
            .map_err(|e| self.request_error(&e))?;
        let revision = counted.header().map_or(0, |h| h.revision());
        let expected = u64::try_from(counted.count()).unwrap_or(0);

        let mut page_size = paging.page_size.max(1);
        let mut start = prefix.to_vec();
        let (mut pages, mut keys) = (0u64, 0u64);
        loop {
            let options = consistency(
                GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(i64::from(page_size))
                    .with_revision(revision),
            );
            let mut page = match kv.get(start.clone(), Some(options)).await {
                Ok(page) => page,
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                    return Err(EtcdError::Compacted { revision });
                }
                Err(etcd_client::Error::GRpcStatus(s))
                    if page_size > 1 && s.message().contains("message length too large") =>
                {
                    page_size /= 2;
                    continue;
                }
                Err(e) => return Err(self.request_error(&e)),
            };
            pages += 1;
            let more = page.more();
            let kvs = page.take_kvs();
            for pair in &kvs {
                each(pair.key(), pair.value());
            }
            keys += kvs.len() as u64;
            progress(Progress {
                keys,
                expected,
                pages,
            });
            match kvs.last() {
                Some(last) if more => {
                    start.clear();
                    start.extend_from_slice(last.key());
                    start.push(0);
                }
                _ => break,
            }
        }
        if keys != expected {
            return Err(EtcdError::Inconsistent {
                revision,
                expected,
                keys,
            });
        }
        Ok(Paged {
            revision,
            expected,
            pages,
            keys,
            final_page_size: page_size,
        })
    }

    fn request_error(&self, e: &etcd_client::Error) -> EtcdError {
        let detail = chain(e);
        let lower = detail.to_lowercase();
        let hint = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            format!(
                " — etcd's certificate is not signed by --cacert {}: pass the CA of etcd's serving certificate \
                 (kubeadm: /etc/kubernetes/pki/etcd/ca.crt)",
                self.cacert
                    .as_deref()
                    .map_or_else(String::new, |p| p.display().to_string())
            )
        } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            " — etcd's certificate does not name this host: use the address the apiserver's --etcd-servers uses"
                .to_owned()
        } else if self.cacert.is_some()
            && [
                "certificate required",
                "certificaterequired",
                "bad certificate",
                "badcertificate",
                "unknown ca",
                "unknownca",
                "connection closed",
                "connection reset",
                "broken pipe",
            ]
            .iter()
            .any(|s| lower.contains(s))
        {
            // With TLS 1.3 a server refusing the client certificate may
            // send an alert or just close the connection after the
            // handshake: which one the client sees depends on timing.
            match &self.client_cert {
                None => {
                    " — etcd requires a client certificate: pass --cert and --key of one it trusts \
                         (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)"
                        .to_owned()
                }
                Some((cert, _)) => format!(
                    " — etcd refused the client certificate --cert {}: pass --cert and --key of one it trusts \
                     (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)",
                    cert.display()
                ),
            }
        } else if lower.contains("connection refused")
            || lower.contains("timed out")
            || lower.contains("deadline")
        {
            " — is etcd listening there? Use the apiserver's --etcd-servers".to_owned()
        } else if lower.contains("permission denied") || lower.contains("user name is empty") {
            " — etcd's authentication refused the read: use a client certificate with read access to the prefix"
                .to_owned()
        } else {
            String::new()
        };
        EtcdError::Request {
            endpoints: self.endpoints.join(","),
            detail,
            hint,
        }
    }
}

/// TLS files larger than this are refused (a PEM bundle is kilobytes).
const MAX_TLS_FILE_LEN: u64 = 16 << 20;

/// Reads a TLS file; never a plain read, which a FIFO would block forever.
fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    use crate::file::{Links, OpenError, open_regular};
    use std::io::Read as _;
    let fail = |error| EtcdError::File {
        flag,
        path: path.to_owned(),
        error,
    };
    let (file, _) = open_regular(path, Links::Follow).map_err(|e| {
        fail(match e {
            OpenError::NotFound { .. } => std::io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error()),
            OpenError::Io { source, .. } => source,
            OpenError::NotRegular { what, .. } => std::io::Error::other(format!(
                "it is {what}, not a regular file; nothing was read from it: give {flag} the PEM file itself"
            )),
            e @ OpenError::Symlink { .. } => std::io::Error::other(e.to_string()),
        })
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_TLS_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_TLS_FILE_LEN {
        return Err(fail(std::io::Error::other(format!(
            "it is more than {MAX_TLS_FILE_LEN} bytes: not a PEM file"
        ))));
    }
    Ok(bytes)
}

/// An error and its causes, each once: `transport error: tcp connect error: …`.
fn chain(e: &etcd_client::Error) -> String {
    // A gRPC status prints itself with Debug-formatted causes: say its
    // code and message, then walk the causes the same way as for others.
    let (mut out, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => (
            format!("{:?}: {}", s.code(), s.message()),
            std::error::Error::source(s),
        ),
        e => (e.to_string(), e.source()),
    };
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The end of the range of keys starting with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented; `\0` for all keys).
pub fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(b) = end.last_mut() {
                *b += 1;
            }
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::range_end;

    #[test]
    fn range_ends() {
        assert_eq!(range_end(b"/registry/"), b"/registry0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), b"\0");
        assert_eq!(range_end(b""), b"\0");
    }
}
