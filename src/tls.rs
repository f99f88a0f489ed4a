//! HTTPS clients for providers: rustls with the *ring* crypto provider (no OpenSSL, no C build),
//! and either a configured CA bundle or the public web PKI roots (webpki-roots, so a minimal
//! container image without a system trust store still works). Nothing here can turn
//! verification off.

use std::sync::Once;

use rustls::pki_types::pem::PemObject;

/// Makes *ring* the process's rustls crypto provider (once; reqwest asks rustls for it).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if a provider was installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
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
    Ok(reqwest::Client::builder().use_preconfigured_tls(config))
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
