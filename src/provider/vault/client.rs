//! The Vault HTTP API edge: one request, its headers, TLS, size limit and the mapping of
//! Vault's status codes to [`ProviderError`]. Knows nothing of tokens' lifecycles or secret
//! engines (see the parent module).
//!
//! Bodies are read into [`SecretBytes`] (zeroized on drop) chunk by chunk with a size cap. The
//! HTTP and TLS layers' own buffers are not under our control; they are reused or freed by
//! hyper and rustls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;

use crate::provider::ProviderError;
use crate::secret::SecretBytes;

/// Largest Vault response read (a KV secret is at most 1 MiB in Vault by default).
const MAX_BODY: usize = 2 * 1024 * 1024;
/// Longest Vault error text passed on (Vault's messages are one line).
const MAX_ERROR_TEXT: usize = 300;

/// How to reach one Vault server.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// `https://vault.example:8200`. Plain `http` only for loopback (tests, a local agent).
    pub address: String,
    /// Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    /// PEM CA certificates to trust instead of the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Name to verify the server certificate against, when it differs from the address's host.
    pub tls_server_name: Option<String>,
    pub timeout: Duration,
}

/// A Vault reply: status and body (the body may hold secrets).
pub struct Reply {
    pub status: u16,
    pub body: SecretBytes,
    pub retry_after: Option<Duration>,
}

/// HTTP clients (connection pools) by endpoint, shared by every identity using that Vault
/// server: a cold mount after an identity logged out reuses open TLS connections.
fn pools() -> &'static Mutex<HashMap<String, (reqwest::Client, String)>> {
    static POOLS: OnceLock<Mutex<HashMap<String, (reqwest::Client, String)>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    namespace: Option<String>,
    /// Every request sent (for metrics and the request-count tests).
    pub requests: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("vault::Client")
            .field("base", &self.base)
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    pub fn new(ep: &Endpoint) -> Result<Self, String> {
        let address = ep.address.trim_end_matches('/');
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| format!("vault address {address:?} must start with https://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if rest.contains('/') || authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "vault address {address:?} must be scheme://host[:port], without a path or user"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("vault address {address:?} has a bad port"))?,
            ),
            _ => (authority, if scheme == "https" { 443 } else { 80 }),
        };
        match scheme {
            "https" => {}
            "http" if is_loopback(host) => {
                tracing::warn!(
                    address,
                    "Vault over plain http on loopback: tokens and secrets are not encrypted in transit"
                );
            }
            _ => {
                return Err(format!(
                    "vault address {address:?} must use https (plain http is allowed only on loopback)"
                ));
            }
        }
        let pool_key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(address.as_bytes());
            h.update([0]);
            h.update(ep.ca_pem.as_deref().unwrap_or_default());
            h.update([0]);
            h.update(ep.tls_server_name.as_deref().unwrap_or_default().as_bytes());
            h.update(ep.timeout.as_millis().to_le_bytes());
            hex::encode(h.finalize())
        };
        let namespace = ep.namespace.clone().filter(|n| !n.is_empty());
        let (http, base) = crate::tls::pooled(pools(), pool_key, || {
            Self::build(ep, scheme, host, port, address)
        })?;
        Ok(Self {
            http,
            base,
            namespace,
            requests: AtomicU64::new(0),
        })
    }

    /// A new HTTP client for the endpoint, and the base URL its requests go to.
    fn build(
        ep: &Endpoint,
        scheme: &str,
        host: &str,
        port: u16,
        address: &str,
    ) -> Result<(reqwest::Client, String), String> {
        let mut b = crate::tls::client_builder(ep.ca_pem.as_deref(), "Vault")?
            .https_only(scheme == "https")
            .timeout(if ep.timeout.is_zero() {
                Duration::from_secs(30)
            } else {
                ep.timeout
            })
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60));
        let base = match &ep.tls_server_name {
            // Connect to the address, verify the certificate for the given name: requests go to
            // the name, which is resolved to the address's IPs.
            Some(name) => {
                use std::net::ToSocketAddrs;
                let addrs: Vec<_> = (host.trim_matches(['[', ']']), port)
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve the Vault address {host:?}: {e}"))?
                    .collect();
                b = b.resolve_to_addrs(name, &addrs);
                format!("{scheme}://{name}:{port}")
            }
            None => address.to_owned(),
        };
        let http = b
            .build()
            .map_err(|e| format!("cannot set up the Vault HTTP client: {e}"))?;
        Ok((http, base))
    }

    /// Sends one request to `/v1/<path>` with the token and JSON body given.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretBytes>,
        body: Option<SecretBytes>,
    ) -> Result<Reply, ProviderError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .http
            .request(method, format!("{}/v1/{}", self.base, path))
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_bytes(t.expose()).map_err(|_| {
                ProviderError::Invalid {
                    provider: "vault",
                    object: path.to_owned(),
                    detail: "the Vault token is not a valid header value".into(),
                }
            })?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        if let Some(b) = body {
            // reqwest takes ownership of the bytes; this copy is the one the HTTP layer sends.
            req = req
                .header("Content-Type", "application/json")
                .body(b.expose().to_vec());
        }
        let mut resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut buf = zeroize::Zeroizing::new(Vec::new());
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(e))? {
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(ProviderError::Invalid {
                    provider: "vault",
                    object: path.to_owned(),
                    detail: format!("Vault's response is larger than {MAX_BODY} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            body: SecretBytes::new(std::mem::take(&mut *buf)),
            retry_after,
        })
    }

    /// Names the server and namespace (for caches of server facts such as mount types).
    pub fn server_key(&self) -> String {
        format!("{}|{}", self.base, self.namespace.as_deref().unwrap_or(""))
    }

    fn transport_error(&self, e: reqwest::Error) -> ProviderError {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        // reqwest's message names the URL (no credentials in it) and the cause chain.
        let mut detail = format!("cannot reach Vault at {} ({what}): {e}", self.base);
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail.push_str(&format!(": {s}"));
            src = s.source();
        }
        ProviderError::Unavailable {
            provider: "vault",
            detail,
        }
    }
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<String>,
}

/// Vault's error messages from a reply body, shortened, with any of `hide` (tokens) removed.
pub fn error_text(body: &SecretBytes, hide: &[&[u8]]) -> String {
    let errors = serde_json::from_slice::<Errors>(body.expose())
        .map(|e| e.errors)
        .unwrap_or_default();
    let mut text = if errors.is_empty() {
        "no error message".to_owned()
    } else {
        errors.join("; ")
    };
    for h in hide {
        if let Ok(h) = std::str::from_utf8(h)
            && h.len() >= 8
            && text.contains(h)
        {
            text = text.replace(h, "<redacted>");
        }
    }
    if text.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Maps a non-success Vault reply to an error about `object`.
pub fn status_error(reply: &Reply, object: &str, context: &str) -> ProviderError {
    let text = error_text(&reply.body, &[]);
    let object = object.to_owned();
    match reply.status {
        403 => ProviderError::PermissionDenied {
            provider: "vault",
            object,
            code: "vault-permission-denied".into(),
            detail: format!("{context}: Vault said permission denied ({text})"),
        },
        404 => ProviderError::NotFound {
            provider: "vault",
            object,
        },
        429 => ProviderError::Throttled {
            provider: "vault",
            retry_after: reply.retry_after,
        },
        503 => ProviderError::Unavailable {
            provider: "vault",
            detail: format!("Vault is sealed or not active (503) reading {object:?}: {text}"),
        },
        s if s >= 500 => ProviderError::Unavailable {
            provider: "vault",
            detail: format!("Vault failed ({s}) reading {object:?}: {text}"),
        },
        s => ProviderError::Invalid {
            provider: "vault",
            object,
            detail: format!("{context}: Vault refused the request ({s}): {text}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_https_except_on_loopback() {
        let ep = |a: &str| Endpoint {
            address: a.into(),
            ..Default::default()
        };
        assert!(Client::new(&ep("https://vault.example:8200")).is_ok());
        assert!(Client::new(&ep("http://127.0.0.1:8200")).is_ok());
        assert!(Client::new(&ep("http://localhost:8200")).is_ok());
        for bad in [
            "http://vault.example:8200",
            "vault:8200",
            "https://user@vault",
            "https://vault/v1",
            "https://vault:port",
        ] {
            assert!(Client::new(&ep(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_text_hides_tokens_and_is_bounded() {
        let body = SecretBytes::new(
            br#"{"errors":["bad token s.SECRETTOKEN123 here", "second"]}"#.to_vec(),
        );
        let t = error_text(&body, &[b"s.SECRETTOKEN123"]);
        assert_eq!(t, "bad token <redacted> here; second");
        let long = format!(r#"{{"errors":["{}"]}}"#, "é".repeat(400));
        assert!(error_text(&SecretBytes::new(long.into_bytes()), &[]).len() <= MAX_ERROR_TEXT + 3);
        assert_eq!(
            error_text(&SecretBytes::new(b"<html>".to_vec()), &[]),
            "no error message"
        );
    }
}
