//! Azure Key Vault, as one Azure identity (a pod's workload identity, or a managed identity a
//! binding grants).
//!
//! Objects are named `secret/NAME`, `cert/NAME` or `key/NAME` (what bindings match), with
//! `vault=VAULT&format=pem|pfx` in the request parameters. What a file receives:
//! - `secret`: the value; for a certificate's backing secret stored as PKCS#12 and
//!   `objectFormat: pem` (the default), Key Vault's own PFX-to-PEM conversion
//!   (`outContentType`), so the file holds the private key and the chain; with
//!   `objectFormat: pfx`, the base64 PFX as stored (`objectEncoding: base64` writes it binary);
//! - `cert`: the public certificate (`cer`) as PEM;
//! - `key`: the public key (RSA or EC JWK) as a PEM SubjectPublicKeyInfo.
//!
//! The Key Vault calls go through Microsoft's Rust SDK clients (secrets, keys, certificates),
//! with keybroker's transport (rustls, the binding's CA bundle), no SDK retries (keybroker's
//! cache and backoff decide when to come back) and keybroker's token source as the credential.
//! Every vault has a request budget well under Key Vault's limit of 4,000 GETs per 10 s.

pub mod pem;
pub mod token;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_security_keyvault_certificates::{CertificateClient, CertificateClientOptions};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};

use crate::provider::{BoxFuture, ObjectRequest, Provider, ProviderError};
use crate::secret::{Expiry, SecretBytes, SecretObject};

pub use token::{ManagedEndpoint, PodJwt, Source, TokenSource};

pub const KIND: &str = "azure";

/// Key Vault GETs one identity may send to one vault per window (Key Vault allows 4,000 per
/// 10 s per vault; keybroker stays at half of that, whatever the number of volumes).
const VAULT_BUDGET: u32 = 2_000;
const VAULT_WINDOW: Duration = Duration::from_secs(10);
/// How long a vault stays closed after a 429 that names no `Retry-After`.
const THROTTLE_DEFAULT: Duration = Duration::from_secs(1);

/// The Key Vault resource (token audience) of the public cloud.
pub const KEYVAULT_RESOURCE: &str = "https://vault.azure.net";

/// How an identity reaches Key Vault.
pub struct VaultAccess {
    /// `vault.azure.net`, or a sovereign cloud's, or a test's (`vault.localhost:8443`).
    pub dns_suffix: String,
    /// Whether the SDK checks that a challenge's resource matches the vault host (off only for
    /// a suffix that is not a public or sovereign cloud's, which the binding names).
    pub verify_challenge_resource: bool,
}

#[derive(Debug, Default)]
pub struct AzureStats {
    /// Key Vault requests that returned (or failed with) an answer.
    pub keyvault_gets: AtomicU64,
}

struct VaultClients {
    secrets: SecretClient,
    keys: KeyClient,
    certs: CertificateClient,
    budget: Mutex<(std::time::Instant, u32)>,
    /// Until when Key Vault asked this identity to stay away from this vault (a 429's
    /// `Retry-After`). Key Vault throttles per vault, not per object: no request for any
    /// object of the vault goes out before then.
    throttled_until: Mutex<Option<std::time::Instant>>,
    /// Whether a request has gone through the bearer challenge (the SDK then knows the vault's
    /// tenant and resource). Until then requests go one at a time, so a volume's ten parallel
    /// first GETs cost one challenge, not ten.
    primed: std::sync::atomic::AtomicBool,
    first: tokio::sync::Mutex<()>,
}

pub struct AzureProvider {
    tokens: Arc<TokenSource>,
    http: reqwest::Client,
    access: VaultAccess,
    vaults: Mutex<HashMap<String, Arc<VaultClients>>>,
    pub stats: AzureStats,
}

/// The SDK's view of keybroker's token source.
#[derive(Debug)]
struct Credential(Arc<TokenSource>);

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl TokenCredential for Credential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let scope = scopes.first().copied().unwrap_or(KEYVAULT_RESOURCE);
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        match self.0.token(resource).await {
            Ok((token, expires)) => {
                let secs = expires
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                let at = time::OffsetDateTime::from_unix_timestamp(secs)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                Ok(AccessToken::new(Secret::new(token.to_string()), at))
            }
            // The provider reports the token source's own error (AADSTS code and all).
            Err(e) => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                e.to_string(),
            )),
        }
    }
}

impl AzureProvider {
    pub fn new(tokens: Arc<TokenSource>, http: reqwest::Client, access: VaultAccess) -> Arc<Self> {
        Arc::new(Self {
            tokens,
            http,
            access,
            vaults: Mutex::new(HashMap::new()),
            stats: AzureStats::default(),
        })
    }

    pub fn tokens(&self) -> &Arc<TokenSource> {
        &self.tokens
    }

    fn clients(&self, vault: &str) -> Result<Arc<VaultClients>, ProviderError> {
        let mut vaults = self.vaults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = vaults.get(vault) {
            return Ok(c.clone());
        }
        let url = format!("https://{vault}.{}/", self.access.dns_suffix);
        let options = || ClientOptions {
            retry: RetryOptions::none(),
            transport: Some(Transport::new(Arc::new(self.http.clone()))),
            // Key Vault's logs then name keybroker before the SDK (`keybroker-node-0.1.0
            // azsdk-rust-...`).
            user_agent: azure_core::http::UserAgentOptions {
                application_id: Some(crate::tls::azure_application_id()),
            },
            ..Default::default()
        };
        let cred: Arc<dyn TokenCredential> = Arc::new(Credential(self.tokens.clone()));
        let verify = Some(self.access.verify_challenge_resource);
        let setup = |e: azure_core::Error| ProviderError::Invalid {
            provider: KIND,
            object: vault.to_owned(),
            detail: format!("cannot set up the Key Vault client for {url}: {e}"),
        };
        let clients = Arc::new(VaultClients {
            secrets: SecretClient::new(
                &url,
                cred.clone(),
                Some(SecretClientOptions {
                    client_options: options(),
                    verify_challenge_resource: verify,
                    ..Default::default()
                }),
            )
            .map_err(setup)?,
            keys: KeyClient::new(
                &url,
                cred.clone(),
                Some(KeyClientOptions {
                    client_options: options(),
                    verify_challenge_resource: verify,
                    ..Default::default()
                }),
            )
            .map_err(setup)?,
            certs: CertificateClient::new(
                &url,
                cred,
                Some(CertificateClientOptions {
                    client_options: options(),
                    verify_challenge_resource: verify,
                    ..Default::default()
                }),
            )
            .map_err(setup)?,
            budget: Mutex::new((std::time::Instant::now(), 0)),
            throttled_until: Mutex::new(None),
            primed: Default::default(),
            first: tokio::sync::Mutex::new(()),
        });
        vaults.insert(vault.to_owned(), clients.clone());
        Ok(clients)
    }

    /// Starts the token exchange while the first request to a vault goes out unauthorized for
    /// its bearer challenge, so the two round trips overlap (the SDK's request for the token
    /// then joins this one: the token source is single-flight). Only where the challenge's
    /// resource is known beforehand: a public or sovereign cloud's vault suffix, whose
    /// resource is `https://<suffix>`.
    fn prefetch_token(&self) {
        if !self.access.verify_challenge_resource {
            return;
        }
        let resource = format!("https://{}", self.access.dns_suffix);
        let tokens = self.tokens.clone();
        tokio::spawn(async move {
            // Its error, if any, is the token source's last error, which the read reports.
            let _ = tokens.token(&resource).await;
        });
    }

    /// Waits for room in the vault's request budget; refuses at once while the vault has
    /// asked this identity to wait (the caller's backoff then comes back after that).
    async fn spend(&self, clients: &VaultClients) -> Result<(), ProviderError> {
        let now = std::time::Instant::now();
        if let Some(until) = *clients
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            && until > now
        {
            return Err(ProviderError::Throttled {
                provider: KIND,
                retry_after: Some(until - now),
            });
        }
        loop {
            let wait = {
                let mut b = clients.budget.lock().unwrap_or_else(|p| p.into_inner());
                if b.0.elapsed() >= VAULT_WINDOW {
                    *b = (std::time::Instant::now(), 0);
                }
                if b.1 < VAULT_BUDGET {
                    b.1 += 1;
                    return Ok(());
                }
                VAULT_WINDOW.saturating_sub(b.0.elapsed())
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// What a failed Key Vault call means, naming the vault and object. A 429 closes the
    /// vault to this identity until its `Retry-After` (1 s when it names none).
    fn kv_error(
        &self,
        clients: &VaultClients,
        vault: &str,
        object: &str,
        e: azure_core::Error,
    ) -> ProviderError {
        let err = self.kv_error_kind(vault, object, e);
        if let ProviderError::Throttled { retry_after, .. } = &err {
            let until = std::time::Instant::now() + retry_after.unwrap_or(THROTTLE_DEFAULT);
            let mut t = clients
                .throttled_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *t = Some(t.map_or(until, |old| old.max(until)));
            tracing::warn!(
                vault,
                identity = %self.tokens.identity,
                retry_after_ms = retry_after.unwrap_or(THROTTLE_DEFAULT).as_millis() as u64,
                "Key Vault is throttling: no request to this vault until Retry-After"
            );
        }
        err
    }

    fn kv_error_kind(&self, vault: &str, object: &str, e: azure_core::Error) -> ProviderError {
        use azure_core::error::ErrorKind;
        let named = format!("{vault}/{object}");
        match e.kind() {
            ErrorKind::Credential => {
                self.tokens
                    .last_error()
                    .unwrap_or(ProviderError::Unavailable {
                        provider: KIND,
                        detail: format!("no access token for {}: {e}", self.tokens.identity),
                    })
            }
            ErrorKind::HttpResponse {
                status,
                error_code,
                raw_response,
            } => {
                let status = u16::from(*status);
                let code = error_code
                    .clone()
                    .unwrap_or_else(|| format!("http-{status}"));
                let message = raw_response
                    .as_ref()
                    .map(|r| error_message(r.body()))
                    .unwrap_or_default();
                let retry_after = raw_response.as_ref().and_then(|r| {
                    r.headers()
                        .get_optional_string(&azure_core::http::headers::HeaderName::from_static(
                            "retry-after",
                        ))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                });
                match status {
                    404 => ProviderError::NotFound {
                        provider: KIND,
                        object: named,
                    },
                    401 | 403 => ProviderError::PermissionDenied {
                        provider: KIND,
                        object: named,
                        code,
                        detail: format!(
                            "Key Vault refused {} ({status}): {message}",
                            self.tokens.identity
                        ),
                    },
                    429 => ProviderError::Throttled {
                        provider: KIND,
                        retry_after,
                    },
                    s if s >= 500 => ProviderError::Unavailable {
                        provider: KIND,
                        detail: format!("Key Vault {vault} answered {s} ({code}) for {object}"),
                    },
                    s => ProviderError::Invalid {
                        provider: KIND,
                        object: named,
                        detail: format!("Key Vault answered {s} ({code}): {message}"),
                    },
                }
            }
            _ => ProviderError::Unavailable {
                provider: KIND,
                detail: format!("cannot reach Key Vault {vault} for {object}: {e}"),
            },
        }
    }

    async fn read(&self, req: &ObjectRequest) -> Result<SecretObject, ProviderError> {
        let invalid = |detail: &str| ProviderError::Invalid {
            provider: KIND,
            object: req.name.clone(),
            detail: detail.to_owned(),
        };
        let params = req.params.as_deref().unwrap_or_default();
        let mut vault = None;
        let mut format = "pem";
        let mut history = None;
        for kv in params.split('&') {
            match kv.split_once('=') {
                Some(("vault", v)) => vault = Some(v),
                Some(("format", f)) => format = f,
                Some(("history", n)) => history = n.parse::<usize>().ok(),
                _ => {}
            }
        }
        let vault = vault.ok_or_else(|| invalid("no vault named (keyvaultName)"))?;
        let (kind, name) = req
            .name
            .split_once('/')
            .ok_or_else(|| invalid("object names are secret/NAME, cert/NAME or key/NAME"))?;
        let clients = self.clients(vault)?;
        let _first = if clients.primed.load(Ordering::Acquire) {
            None
        } else {
            let guard = clients.first.lock().await;
            // Whoever held it has been through the challenge: go on in parallel.
            let first = (!clients.primed.load(Ordering::Acquire)).then_some(guard);
            if first.is_some() {
                self.prefetch_token();
            }
            first
        };
        let res = match history {
            Some(n) if kind == "secret" => self.read_history(&clients, vault, name, n, req).await,
            _ => {
                self.read_from(&clients, vault, kind, name, format, req)
                    .await
            }
        };
        clients.primed.store(true, Ordering::Release);
        res
    }

    /// The `n` newest enabled versions of a secret, as a JSON array of their values (newest
    /// first); the object's version is the newest one's.
    async fn read_history(
        &self,
        clients: &VaultClients,
        vault: &str,
        name: &str,
        n: usize,
        req: &ObjectRequest,
    ) -> Result<SecretObject, ProviderError> {
        use futures::TryStreamExt;
        self.spend(clients).await?;
        self.stats.keyvault_gets.fetch_add(1, Ordering::Relaxed);
        let mut pager = clients
            .secrets
            .list_secret_properties_versions(name, None)
            .map_err(|e| self.kv_error(clients, vault, &req.name, e))?;
        let mut versions = Vec::new();
        while let Some(p) = pager
            .try_next()
            .await
            .map_err(|e| self.kv_error(clients, vault, &req.name, e))?
        {
            let attrs = p.attributes.as_ref();
            if attrs.and_then(|a| a.enabled) == Some(false) {
                continue;
            }
            let created = attrs.and_then(|a| a.created).map(to_system_time);
            let id =
                p.id.as_deref()
                    .and_then(|i| i.rsplit('/').next())
                    .unwrap_or_default()
                    .to_owned();
            versions.push((created, versions.len(), id));
            if versions.len() > 10_000 {
                break;
            }
        }
        // Newest first by creation time (whole seconds); versions created in the same second
        // keep the reverse of the listing's order, which lists them as they were created.
        versions.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        versions.truncate(n);
        if versions.is_empty() {
            return Err(ProviderError::NotFound {
                provider: KIND,
                object: format!("{vault}/{}", req.name),
            });
        }
        let mut values = Vec::with_capacity(versions.len());
        for (_, _, version) in &versions {
            let one = ObjectRequest {
                name: req.name.clone(),
                version: Some(version.clone()),
                params: None,
            };
            let obj = self
                .read_from(clients, vault, "secret", name, "raw", &one)
                .await?;
            values.push(zeroize::Zeroizing::new(
                String::from_utf8_lossy(obj.value.expose()).into_owned(),
            ));
        }
        let json = serde_json::to_vec(&values.iter().map(|v| v.as_str()).collect::<Vec<_>>())
            .map_err(|e| ProviderError::Invalid {
                provider: KIND,
                object: req.name.clone(),
                detail: format!("cannot assemble the version history: {e}"),
            })?;
        Ok(SecretObject {
            value: SecretBytes::new(json),
            version: versions[0].2.clone(),
            content_type: Some("application/json".into()),
            expiry: None,
            lease: None,
        })
    }

    async fn read_from(
        &self,
        clients: &VaultClients,
        vault: &str,
        kind: &str,
        name: &str,
        format: &str,
        req: &ObjectRequest,
    ) -> Result<SecretObject, ProviderError> {
        self.spend(clients).await?;
        self.stats.keyvault_gets.fetch_add(1, Ordering::Relaxed);
        match kind {
            "secret" => self.read_secret(clients, vault, name, format, req).await,
            "cert" => self.read_cert(clients, vault, name, req).await,
            "key" => self.read_key(clients, vault, name, req).await,
            _ => Err(invalid(req, "object types are secret, cert and key")),
        }
    }

    /// A secret (a certificate's backing secret stored as PKCS#12 is asked again as PEM).
    async fn read_secret(
        &self,
        clients: &VaultClients,
        vault: &str,
        name: &str,
        format: &str,
        req: &ObjectRequest,
    ) -> Result<SecretObject, ProviderError> {
        let mut options = azure_security_keyvault_secrets::models::SecretClientGetSecretOptions {
            secret_version: req.version.clone(),
            ..Default::default()
        };
        let first = clients
            .secrets
            .get_secret(name, Some(options.clone()))
            .await
            .and_then(|r| r.into_model())
            .map_err(|e| self.kv_error(clients, vault, &req.name, e))?;
        // A certificate's backing secret stored as PKCS#12: Key Vault converts it to
        // PEM (key and chain) when asked, so no PKCS#12 code runs here.
        let pkcs12 = first.content_type.as_deref() == Some("application/x-pkcs12");
        let secret = if pkcs12 && format == "pem" {
            options.out_content_type =
                Some(azure_security_keyvault_secrets::models::ContentType::Pem);
            options.secret_version = Some(version_of(first.id.as_ref()));
            self.spend(clients).await?;
            self.stats.keyvault_gets.fetch_add(1, Ordering::Relaxed);
            clients
                .secrets
                .get_secret(name, Some(options))
                .await
                .and_then(|r| r.into_model())
                .map_err(|e| self.kv_error(clients, vault, &req.name, e))?
        } else {
            first
        };
        // Key Vault's `exp` is an attribute of the stored object: a new version may
        // come before it, so it only makes the object due sooner than the poll.
        let expiry = secret
            .attributes
            .as_ref()
            .and_then(|a| a.expires)
            .map(|t| Expiry::Stored(to_system_time(t)));
        let value = secret
            .value
            .ok_or_else(|| invalid(req, "Key Vault returned the secret without a value"))?;
        Ok(SecretObject {
            value: SecretBytes::new(value.into_bytes()),
            version: version_of(secret.id.as_ref()),
            content_type: secret.content_type,
            expiry,
            lease: None,
        })
    }

    /// A certificate: its public part (`cer`) as PEM.
    async fn read_cert(
        &self,
        clients: &VaultClients,
        vault: &str,
        name: &str,
        req: &ObjectRequest,
    ) -> Result<SecretObject, ProviderError> {
        let options =
            azure_security_keyvault_certificates::models::CertificateClientGetCertificateOptions {
                certificate_version: req.version.clone(),
                ..Default::default()
            };
        let cert = clients
            .certs
            .get_certificate(name, Some(options))
            .await
            .and_then(|r| r.into_model())
            .map_err(|e| self.kv_error(clients, vault, &req.name, e))?;
        let der = cert
            .cer
            .ok_or_else(|| invalid(req, "Key Vault returned the certificate without cer"))?;
        Ok(SecretObject {
            value: SecretBytes::new(pem::pem("CERTIFICATE", &der).into_bytes()),
            version: version_of(cert.id.as_ref()),
            content_type: Some("application/x-pem-file".into()),
            expiry: cert
                .attributes
                .as_ref()
                .and_then(|a| a.expires)
                .map(|t| Expiry::Stored(to_system_time(t))),
            lease: None,
        })
    }

    /// A key: its public part as PEM (RSA or EC).
    async fn read_key(
        &self,
        clients: &VaultClients,
        vault: &str,
        name: &str,
        req: &ObjectRequest,
    ) -> Result<SecretObject, ProviderError> {
        use azure_security_keyvault_keys::models::{CurveName, KeyType};
        let options = azure_security_keyvault_keys::models::KeyClientGetKeyOptions {
            key_version: req.version.clone(),
            ..Default::default()
        };
        let key = clients
            .keys
            .get_key(name, Some(options))
            .await
            .and_then(|r| r.into_model())
            .map_err(|e| self.kv_error(clients, vault, &req.name, e))?;
        let jwk = key
            .key
            .ok_or_else(|| invalid(req, "Key Vault returned the key without its JWK"))?;
        let pem = match jwk.kty {
            Some(KeyType::Rsa | KeyType::RsaHsm) => {
                let (Some(n), Some(e)) = (&jwk.n, &jwk.e) else {
                    return Err(invalid(req, "the RSA key has no n or e"));
                };
                pem::rsa_public_key(n, e)
            }
            Some(KeyType::Ec | KeyType::EcHsm) => {
                let curve = match &jwk.crv {
                    Some(CurveName::P256) => "P-256",
                    Some(CurveName::P384) => "P-384",
                    Some(CurveName::P521) => "P-521",
                    Some(CurveName::P256K) => "P-256K",
                    _ => return Err(invalid(req, "the EC key's curve is not supported")),
                };
                let (Some(x), Some(y)) = (&jwk.x, &jwk.y) else {
                    return Err(invalid(req, "the EC key has no x or y"));
                };
                pem::ec_public_key(curve, x, y).map_err(|e| invalid(req, &e))?
            }
            _ => return Err(invalid(req, "only RSA and EC keys have a public PEM form")),
        };
        Ok(SecretObject {
            value: SecretBytes::new(pem.into_bytes()),
            version: version_of(jwk.kid.as_ref()),
            content_type: Some("application/x-pem-file".into()),
            expiry: None,
            lease: None,
        })
    }
}

/// A Key Vault reply the provider cannot use.
fn invalid(req: &ObjectRequest, detail: &str) -> ProviderError {
    ProviderError::Invalid {
        provider: KIND,
        object: req.name.clone(),
        detail: detail.to_owned(),
    }
}

/// The version part of a Key Vault object id (`.../name/VERSION`).
fn version_of(id: Option<&String>) -> String {
    id.and_then(|i| i.rsplit('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// Key Vault's `error.message` from an error body, cut to 300 characters (it names the vault,
/// the object and the caller; never a value).
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .map(|m| m.chars().take(300).collect())
        .unwrap_or_default()
}

/// Entry points for the fuzz targets: what keybroker parses of Key Vault's and Entra's answers
/// itself (the SDK parses the rest).
#[doc(hidden)]
pub mod fuzzing {
    pub fn error_body(body: &[u8]) {
        let _ = super::error_message(body);
    }

    pub use super::token::fuzzing::token_reply;
}

fn to_system_time(t: time::OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

impl Provider for AzureProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn fetch<'a>(
        &'a self,
        req: &'a ObjectRequest,
    ) -> BoxFuture<'a, Result<SecretObject, ProviderError>> {
        Box::pin(self.read(req))
    }
}
