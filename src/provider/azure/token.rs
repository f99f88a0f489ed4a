//! Entra access tokens for one Azure identity: workload identity federation (the pod's
//! service-account token exchanged as a client assertion) or a user-assigned managed identity
//! (IMDS or the App Service identity endpoint).
//!
//! The rules (issue #10, DESIGN §5):
//! - one access token per (identity, resource), shared by every volume of the identity;
//! - refreshed in the background before it expires (5 minutes before, or at half-life for
//!   tokens shorter than 10 minutes), one exchange at a time;
//! - while a refresh fails the last good token keeps being used until it expires;
//! - a pod token Entra refuses is not sent again: the refusal is remembered until kubelet hands
//!   over a new token;
//! - IMDS: at most 5 requests in flight on the node, 429 and 5xx retried with backoff, 410
//!   (IMDS starting up) retried for up to 70 s.
//!
//! Errors carry the AADSTS code and Entra's first line of explanation, never a token.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::provider::ProviderError;

use super::KIND;

/// Exchange or IMDS errors longer than this are cut (Entra's descriptions carry trace ids).
const MAX_ERROR_TEXT: usize = 400;
/// Requests in flight to IMDS on the node (IMDS throttles above 5 per second per VM).
const IMDS_CONCURRENCY: usize = 5;
/// Longest a token from any endpoint is kept, whatever its reply says (seconds).
const MAX_TOKEN_LIFE: u64 = 86_400;
/// How long IMDS's 410 ("still starting") is retried.
const IMDS_GONE_RETRY: Duration = Duration::from_secs(70);

pub use crate::provider::PodJwt;

/// Where a managed identity's tokens come from.
#[derive(Clone, Debug)]
pub enum ManagedEndpoint {
    /// Azure Instance Metadata Service, `http://169.254.169.254` on a VM.
    Imds { base: String },
    /// App Service / Container Apps style: `IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER`.
    AppService {
        endpoint: String,
        header: Arc<Zeroizing<String>>,
    },
}

pub enum Source {
    Federated {
        authority: String,
        tenant: String,
        client_id: String,
        jwts: Mutex<BTreeMap<String, PodJwt>>,
    },
    Managed {
        client_id: String,
        endpoint: ManagedEndpoint,
    },
}

struct Cached {
    token: Arc<Zeroizing<String>>,
    expires: SystemTime,
    refresh_at: SystemTime,
    /// Not used in its last stretch (10 s, or a quarter of a short token's life), so a request
    /// never leaves with a token that expires on the way.
    margin: Duration,
}

/// Counters the tests and the benchmark read.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Token requests sent (exchanges at Entra, or IMDS / App Service requests).
    pub exchanges: AtomicU64,
    pub refusals: AtomicU64,
}

pub struct TokenSource {
    source: Source,
    http: reqwest::Client,
    /// Names the identity in logs and errors (no secret).
    pub identity: String,
    tokens: Mutex<HashMap<String, Cached>>,
    flight: tokio::sync::Mutex<()>,
    /// The last error of a token request (the Key Vault client reports it for failed calls).
    last_error: Mutex<Option<ProviderError>>,
    pub stats: TokenStats,
    stop: CancellationToken,
}

impl Drop for TokenSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Pod tokens Entra refused, node-wide, until they expire: kubelet retries a failed publish
/// with the same token, and that must not become an exchange per retry. Keyed by a digest of
/// the identity and the token (the token itself is not kept).
struct Refusals(Mutex<HashMap<[u8; 32], (SystemTime, ProviderError)>>);

fn refusals() -> &'static Refusals {
    static R: std::sync::OnceLock<Refusals> = std::sync::OnceLock::new();
    R.get_or_init(|| Refusals(Mutex::new(HashMap::new())))
}

fn refusal_key(identity: &str, jwt: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update([0]);
    h.update(jwt.as_bytes());
    h.finalize().into()
}

impl Refusals {
    fn get(&self, key: &[u8; 32]) -> Option<ProviderError> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(until, _)| *until > SystemTime::now())
            .map(|(_, e)| e.clone())
    }

    fn insert(&self, key: [u8; 32], expires: Option<SystemTime>, e: ProviderError) {
        let now = SystemTime::now();
        let until = expires.unwrap_or(now + Duration::from_secs(3600));
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (u, _)| *u > now);
        map.insert(key, (until, e));
    }
}

fn imds_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(IMDS_CONCURRENCY))
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: Zeroizing<String>,
    /// Seconds; a number from Entra, a string from IMDS.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    /// Unix seconds as a string (IMDS, App Service).
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct EntraError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u64>,
}

fn number(v: &Option<serde_json::Value>) -> Option<u64> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// When a token from `reply` expires: `expires_on` (Unix seconds, IMDS and App Service) or
/// `expires_in` (seconds from now, Entra), an hour when it says neither, and never more than a
/// day away whatever it says.
fn expiry_of(reply: &TokenReply, now: SystemTime) -> SystemTime {
    let cap = now + Duration::from_secs(MAX_TOKEN_LIFE);
    match (number(&reply.expires_on), number(&reply.expires_in)) {
        (Some(on), _) => SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(on))
            .unwrap_or(now)
            .min(cap),
        (None, Some(secs)) => now + Duration::from_secs(secs.min(MAX_TOKEN_LIFE)),
        (None, None) => now + Duration::from_secs(3600),
    }
}

/// When to refresh a token that lives from now until `expires`.
pub fn refresh_time(now: SystemTime, expires: SystemTime) -> SystemTime {
    let life = expires.duration_since(now).unwrap_or_default();
    if life >= Duration::from_secs(600) {
        expires - Duration::from_secs(300)
    } else {
        now + life / 2
    }
}

fn cut(s: &str) -> String {
    let first = s.split(['\r', '\n']).next().unwrap_or_default();
    let mut out: String = first.chars().take(MAX_ERROR_TEXT).collect();
    if first.chars().count() > MAX_ERROR_TEXT {
        out.push('…');
    }
    out
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

impl TokenSource {
    pub fn new(source: Source, http: reqwest::Client, identity: String) -> Arc<Self> {
        Arc::new(Self {
            source,
            http,
            identity,
            tokens: Mutex::new(HashMap::new()),
            flight: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
            stats: TokenStats::default(),
            stop: CancellationToken::new(),
        })
    }

    /// Gives the identity a volume's service-account token (federation only).
    pub fn set_jwt(&self, volume: &str, jwt: PodJwt) {
        if let Source::Federated { jwts, .. } = &self.source {
            crate::provider::keep_jwt(jwts, volume, jwt);
        }
    }

    /// Forgets the tokens of volumes for which `keep` is false.
    pub fn retain_jwts(&self, keep: impl Fn(&str) -> bool) {
        if let Source::Federated { jwts, .. } = &self.source {
            jwts.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|v, _| keep(v));
        }
    }

    pub fn last_error(&self) -> Option<ProviderError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A valid access token for `resource` (e.g. `https://vault.azure.net`), from the cache or
    /// a new exchange; the refresh after it is scheduled in the background.
    pub async fn token(
        self: &Arc<Self>,
        resource: &str,
    ) -> Result<(Arc<Zeroizing<String>>, SystemTime), ProviderError> {
        // Any token that is still valid is used: refreshing is the background task's job, so
        // volumes never wait for it and a failing Entra sees no extra requests from them.
        if let Some(t) = self.cached(resource, true) {
            return Ok(t);
        }
        let _flight = self.flight.lock().await;
        // Someone else may have fetched it while we waited.
        if let Some(t) = self.cached(resource, true) {
            return Ok(t);
        }
        self.fetch(resource).await.inspect_err(|e| {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        })
    }

    /// The cached token, if it is not due for refresh (or, with `stale_ok`, not expired).
    fn cached(
        &self,
        resource: &str,
        stale_ok: bool,
    ) -> Option<(Arc<Zeroizing<String>>, SystemTime)> {
        let now = SystemTime::now();
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let c = tokens.get(resource)?;
        let fresh = if stale_ok {
            now + c.margin < c.expires
        } else {
            now < c.refresh_at
        };
        fresh.then(|| (c.token.clone(), c.expires))
    }

    async fn fetch(
        self: &Arc<Self>,
        resource: &str,
    ) -> Result<(Arc<Zeroizing<String>>, SystemTime), ProviderError> {
        let (token, expires) = match &self.source {
            Source::Federated { .. } => self.exchange(resource).await?,
            Source::Managed { .. } => self.managed(resource).await?,
        };
        let now = SystemTime::now();
        let token = Arc::new(token);
        let first = {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            let first = !tokens.contains_key(resource);
            tokens.insert(
                resource.to_owned(),
                Cached {
                    token: token.clone(),
                    expires,
                    refresh_at: refresh_time(now, expires),
                    margin: (expires.duration_since(now).unwrap_or_default() / 4)
                        .min(Duration::from_secs(10)),
                },
            );
            first
        };
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if first {
            self.keep_fresh(resource.to_owned());
        }
        Ok((token, expires))
    }

    /// Refreshes the token for `resource` before it is due, for as long as the source lives.
    fn keep_fresh(self: &Arc<Self>, resource: String) {
        let weak = Arc::downgrade(self);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let wait = {
                    let Some(this) = weak.upgrade() else { return };
                    let tokens = this.tokens.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(c) = tokens.get(&resource) else {
                        return;
                    };
                    let due = c
                        .refresh_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if failures == 0 {
                        due
                    } else {
                        crate::rotation::backoff(failures, None, fastrand::f64()).max(due)
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let Some(this) = weak.upgrade() else { return };
                let _flight = this.flight.lock().await;
                if this.cached(&resource, false).is_some() {
                    failures = 0;
                    continue;
                }
                match this.fetch(&resource).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(identity = %this.identity, resource, error = %e, "cannot refresh the Azure access token; the current one is used until it expires");
                        *this.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            }
        });
    }

    /// Workload identity federation: the freshest pod token as a client assertion.
    async fn exchange(
        &self,
        resource: &str,
    ) -> Result<(Zeroizing<String>, SystemTime), ProviderError> {
        let Source::Federated {
            authority,
            tenant,
            client_id,
            jwts,
        } = &self.source
        else {
            unreachable!("exchange is for federated identities");
        };
        let now = SystemTime::now();
        let (pod, assertion, assertion_expires) = {
            let jwts = jwts.lock().unwrap_or_else(|p| p.into_inner());
            let best = jwts
                .values()
                .filter(|j| j.expires.is_none_or(|e| e > now))
                .max_by_key(|j| j.expires);
            match best {
                Some(j) => (j.pod.clone(), j.jwt.clone(), j.expires),
                None => {
                    return Err(ProviderError::Unavailable {
                        provider: KIND,
                        detail: format!(
                            "no unexpired service-account token to exchange for {} (kubelet sends fresh ones at republish)",
                            self.identity
                        ),
                    });
                }
            }
        };
        let memo_key = refusal_key(&self.identity, &assertion);
        if let Some(e) = refusals().get(&memo_key) {
            return Err(e);
        }
        let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
        let scope = format!("{}/.default", resource.trim_end_matches('/'));
        let form: [(&str, &str); 5] = [
            ("client_id", client_id),
            ("scope", &scope),
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ];
        let body = Zeroizing::new(
            form.iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&"),
        );
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable {
                provider: KIND,
                detail: format!(
                    "cannot reach Entra ID at {authority}: {}",
                    transport_error(&e)
                ),
            })?;
        let (status, ra, text) = read_reply(resp).await;
        if status == 200 {
            let reply = parse_reply(&text, &format!("Entra ID at {authority}"))?;
            let expires = expiry_of(&reply, SystemTime::now());
            return Ok((reply.access_token, expires));
        }
        let err: EntraError = serde_json::from_str(&text).unwrap_or_default();
        let code = err
            .error_codes
            .first()
            .map(|c| format!("AADSTS{c}"))
            .unwrap_or_else(|| format!("entra-{status}"));
        let what = if err.error_description.is_empty() {
            format!("HTTP {status} {}", err.error)
        } else {
            cut(&err.error_description)
        };
        match status {
            429 => Err(ProviderError::Throttled {
                provider: KIND,
                retry_after: ra,
            }),
            s if s >= 500 => Err(ProviderError::Unavailable {
                provider: KIND,
                detail: format!("Entra ID answered {s} ({code})"),
            }),
            _ => {
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                let e = ProviderError::PermissionDenied {
                    provider: KIND,
                    object: self.identity.clone(),
                    code: code.clone(),
                    detail: format!(
                        "Entra ID refused to exchange the service-account token of {pod} for client {client_id}: {what}"
                    ),
                };
                refusals().insert(memo_key, assertion_expires, e.clone());
                Err(e)
            }
        }
    }

    /// A managed identity's token from IMDS or the App Service endpoint.
    async fn managed(
        &self,
        resource: &str,
    ) -> Result<(Zeroizing<String>, SystemTime), ProviderError> {
        let Source::Managed {
            client_id,
            endpoint,
        } = &self.source
        else {
            unreachable!("managed is for managed identities");
        };
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let query = |api: &str| {
                format!(
                    "api-version={api}&resource={}&client_id={}",
                    urlencode(resource),
                    urlencode(client_id)
                )
            };
            let req = match endpoint {
                ManagedEndpoint::Imds { base } => self
                    .http
                    .get(format!(
                        "{}/metadata/identity/oauth2/token?{}",
                        base.trim_end_matches('/'),
                        query("2018-02-01")
                    ))
                    .header("Metadata", "true"),
                ManagedEndpoint::AppService { endpoint, header } => self
                    .http
                    .get(format!("{endpoint}?{}", query("2019-08-01")))
                    .header("X-IDENTITY-HEADER", header.as_str()),
            };
            let permit = match endpoint {
                ManagedEndpoint::Imds { .. } => Some(imds_slots().acquire().await),
                ManagedEndpoint::AppService { .. } => None,
            };
            self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
            let resp = req.send().await;
            drop(permit);
            let resp = resp.map_err(|e| ProviderError::Unavailable {
                provider: KIND,
                detail: format!(
                    "cannot reach the managed identity endpoint for {client_id}: {}",
                    transport_error(&e)
                ),
            })?;
            let (status, ra, text) = read_reply(resp).await;
            if status == 200 {
                let reply = parse_reply(&text, "the managed identity endpoint")?;
                let expires = expiry_of(&reply, SystemTime::now());
                return Ok((reply.access_token, expires));
            }
            let retry = match status {
                410 => started.elapsed() < IMDS_GONE_RETRY,
                429 | 500..=599 => attempt < 5,
                _ => false,
            };
            if retry {
                let wait = crate::rotation::backoff(attempt, ra, fastrand::f64());
                tokio::time::sleep(wait).await;
                continue;
            }
            let err: EntraError = serde_json::from_str(&text).unwrap_or_default();
            let what = if err.error_description.is_empty() {
                cut(&text)
            } else {
                cut(&err.error_description)
            };
            return Err(match status {
                429 => ProviderError::Throttled {
                    provider: KIND,
                    retry_after: ra,
                },
                s if s >= 500 || s == 410 => ProviderError::Unavailable {
                    provider: KIND,
                    detail: format!("the managed identity endpoint answered {s}: {what}"),
                },
                s => {
                    self.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    ProviderError::PermissionDenied {
                        provider: KIND,
                        object: self.identity.clone(),
                        code: format!("managed-identity-{s}"),
                        detail: format!(
                            "the managed identity endpoint refused client {client_id}: {what}"
                        ),
                    }
                }
            });
        }
    }
}

/// Status, `Retry-After` and body of a token endpoint's answer (the body may hold a token).
async fn read_reply(resp: reqwest::Response) -> (u16, Option<Duration>, Zeroizing<String>) {
    let status = resp.status().as_u16();
    let ra = retry_after(&resp);
    (
        status,
        ra,
        Zeroizing::new(resp.text().await.unwrap_or_default()),
    )
}

fn parse_reply(text: &str, who: &str) -> Result<TokenReply, ProviderError> {
    serde_json::from_str(text).map_err(|_| ProviderError::Unavailable {
        provider: KIND,
        detail: format!(
            "{who} answered the token request with something that is not a token reply"
        ),
    })
}

/// A transport error without the URL's query (which may carry nothing secret here, but keeps
/// messages short) and without the request body.
fn transport_error(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    s
}

/// `application/x-www-form-urlencoded` value encoding.
fn urlencode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/azure_replies.rs`): everything
/// keybroker itself parses of what Entra ID and managed identity endpoints answer.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    pub fn token_reply(body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        if let Ok(r) = parse_reply(&text, "fuzz") {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let e = expiry_of(&r, now);
            let _ = refresh_time(now, e);
        }
        if let Ok(e) = serde_json::from_str::<EntraError>(&text) {
            let _ = cut(&e.error_description);
        }
        let _ = cut(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_five_minutes_before_or_at_half_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = now + Duration::from_secs(3600);
        assert_eq!(refresh_time(now, hour), hour - Duration::from_secs(300));
        let short = now + Duration::from_secs(120);
        assert_eq!(refresh_time(now, short), now + Duration::from_secs(60));
        assert_eq!(refresh_time(now, now - Duration::from_secs(5)), now);
    }

    #[test]
    fn expiries_from_replies_are_bounded() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let reply = |j: &str| parse_reply(j, "test").unwrap();
        let day = now + Duration::from_secs(MAX_TOKEN_LIFE);
        assert_eq!(
            expiry_of(&reply(r#"{"access_token":"t","expires_in":3599}"#), now),
            now + Duration::from_secs(3599)
        );
        assert_eq!(
            expiry_of(
                &reply(r#"{"access_token":"t","expires_in":"18446744073709551615"}"#),
                now
            ),
            day
        );
        assert_eq!(
            expiry_of(
                &reply(r#"{"access_token":"t","expires_on":"18446744073709551615"}"#),
                now
            ),
            now
        );
        assert_eq!(
            expiry_of(
                &reply(r#"{"access_token":"t","expires_on":"1800000600"}"#),
                now
            ),
            now + Duration::from_secs(600)
        );
        assert_eq!(
            expiry_of(&reply(r#"{"access_token":"t"}"#), now),
            now + Duration::from_secs(3600)
        );
    }

    #[test]
    fn entra_descriptions_are_cut_to_their_first_line() {
        let d = "AADSTS70021: No matching federated identity record found.\r\nTrace ID: x\r\nCorrelation ID: y";
        assert_eq!(
            cut(d),
            "AADSTS70021: No matching federated identity record found."
        );
        assert!(cut(&"x".repeat(1000)).chars().count() <= MAX_ERROR_TEXT + 1);
    }

    #[test]
    fn form_values_are_encoded() {
        assert_eq!(
            urlencode("https://vault.azure.net/.default"),
            "https%3A%2F%2Fvault.azure.net%2F.default"
        );
        assert_eq!(urlencode("a b+c"), "a+b%2Bc");
    }
}
