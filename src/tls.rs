//! HTTPS clients for providers: rustls with the *ring* crypto provider (no OpenSSL, no C build),
//! and either a configured CA bundle or the public web PKI roots (webpki-roots, so a minimal
//! container image without a system trust store still works). Nothing here can turn
//! verification off.

use std::collections::HashMap;
use std::sync::{Mutex, Once, OnceLock};

use rustls::pki_types::pem::PemObject;

/// Makes *ring* the process's rustls crypto provider (once; reqwest asks rustls for it).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if a provider was installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The mode this process runs in (`node`, `provider`, `sidecar`, `init`, `mount`), for the
/// User-Agent of every request it sends.
static MODE: OnceLock<&'static str> = OnceLock::new();

/// Names the process's mode in its User-Agent; set once, at start-up, before any client.
pub fn set_mode(mode: &'static str) {
    let _ = MODE.set(mode);
}

/// `keybroker/<version> (<mode>)`: what Vault's and Key Vault's request logs show, so an
/// operator can tell keybroker's requests from others' (as Vault Agent and the Azure SDKs
/// name themselves).
pub fn user_agent() -> String {
    format!(
        "keybroker/{} ({})",
        env!("CARGO_PKG_VERSION"),
        MODE.get().copied().unwrap_or("library")
    )
}

/// The same for the Azure SDK's `application_id`, which prefixes the SDK's own User-Agent
/// and must be one RFC 9110 token of at most 24 characters: `keybroker-<mode>-<version>`,
/// without the version where it would not fit.
pub fn azure_application_id() -> String {
    let mode = MODE.get().copied().unwrap_or("library");
    let full = format!("keybroker-{mode}-{}", env!("CARGO_PKG_VERSION"));
    let ok = |s: &str| {
        s.len() <= 24
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    };
    if ok(&full) {
        return full;
    }
    let short = format!("keybroker-{mode}");
    if ok(&short) {
        short
    } else {
        "keybroker".into()
    }
}

/// HTTP clients (connection pools, TLS session caches) for the whole process, by a key that
/// names everything they were built from (endpoint, CA bundle, server name, timeouts). Every
/// identity that talks to the same server with the same trust shares one: a cold publish for a
/// new identity reuses the connections other identities opened (bearer tokens travel per
/// request, never with the connection).
pub fn pooled<T: Clone>(
    pools: &Mutex<HashMap<String, T>>,
    key: String,
    build: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    if let Some(c) = pools.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let c = build()?;
    Ok(pools
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(c)
        .clone())
}

/// The HTTPS client for Entra ID and Key Vault with the trust `ca_pem` gives (the public roots
/// without it), shared by every Azure identity of the process (see [`pooled`]).
pub fn azure_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    static POOLS: OnceLock<Mutex<HashMap<String, reqwest::Client>>> = OnceLock::new();
    let key = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(ca_pem.unwrap_or_default()))
    };
    pooled(POOLS.get_or_init(Default::default), key, || {
        client_builder(ca_pem, "Azure")?
            .dns_resolver(LoopbackNames)
            .timeout(std::time::Duration::from_secs(15))
            .connect_timeout(std::time::Duration::from_secs(5))
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot set up the Azure HTTP client: {e}"))
    })
}

/// The public roots keybroker trusts when no CA bundle is configured.
fn public_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A reqwest builder that verifies servers against `ca_pem` (PEM certificates, replacing the
/// public roots) or, without it, the public web PKI. Errors say what is wrong with the bundle.
pub fn client_builder(ca_pem: Option<&[u8]>, what: &str) -> Result<reqwest::ClientBuilder, String> {
    init();
    let roots = match ca_pem {
        None => public_roots(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut n = 0;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| format!("the {what} CA bundle is not PEM certificates: {e}"))?;
                roots.add(cert).map_err(|e| {
                    format!("the {what} CA bundle has an unusable certificate: {e}")
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("the {what} CA bundle holds no certificate"));
            }
            roots
        }
    };
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::ring::default_provider()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup for {what}: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .user_agent(user_agent()))
}

/// Name resolution that answers `localhost` and every `*.localhost` name with the loopback
/// address, as RFC 6761 §6.3 asks of resolvers (glibc only knows `localhost` itself), and asks
/// the system for everything else. Tests name stand-in vaults `kv1.vault.localhost`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopbackNames;

impl reqwest::dns::Resolve for LoopbackNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            if host == "localhost" || host.ends_with(".localhost") {
                let addrs: Vec<std::net::SocketAddr> = vec![
                    (std::net::Ipv4Addr::LOCALHOST, 0).into(),
                    (std::net::Ipv6Addr::LOCALHOST, 0).into(),
                ];
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
