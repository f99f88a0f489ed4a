//! HashiCorp Vault / OpenBao: one [`VaultProvider`] per pod identity on the node, i.e. per
//! (Vault server, namespace, auth mount, role, Kubernetes namespace, service account).
//!
//! - **Login as the pod**: `POST auth/<mount>/login {role, jwt}` with the pod's service-account
//!   token (the same call for Vault's `jwt` and `kubernetes` auth methods). The token used is
//!   the freshest one kubelet gave any of the identity's volumes; the Vault token is shared by
//!   those volumes, renewed in the background at 2/3 of its TTL, replaced by a new login when it
//!   can no longer be renewed or Vault stops accepting it (403 on `lookup-self`), and revoked
//!   (`revoke-self`) when the identity's last volume goes away ([`VaultProvider::revoke`]).
//! - **Objects**: the mount behind a path is looked up once (`sys/internal/ui/mounts/<path>`):
//!   KV v2 reads `<mount>/data/<rest>` (`?version=N` when pinned) and hands out `data.data`; KV v1
//!   and everything else (database `creds/<role>`, PKI `issue/<role>` with `method: POST`) hand
//!   out `data`. A lease (`lease_id`) becomes a [`Lease`] the cache renews; a PKI certificate's
//!   `expiration` becomes the value's hard expiry (reissued at 90% of its life).
//!
//! Leases die with the token that created them, so a lease's duration is capped at what is left
//! of the token: the cache then replaces the secret before the token goes.

mod calls;
mod client;
mod replies;

use calls::{Engine, parse_call};
pub use calls::{check_path, encode_params};
pub use replies::fuzzing;
use replies::{AuthReply, LeaseReply, object_from_reply};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

pub use client::Endpoint;
use client::{Client, Reply, error_text, status_error};

use super::{BoxFuture, ObjectRequest, Provider, ProviderError};
use crate::secret::{Expiry, Lease, SecretBytes, SecretJson, SecretObject, json_bytes};

const KIND: &str = "vault";
/// A Vault token is not used when less than this is left of it: log in again.
const TOKEN_MIN_LEFT: Duration = Duration::from_secs(10);
/// A rejected login is not retried sooner than this unless kubelet hands over a new pod token.
const LOGIN_RETRY: Duration = Duration::from_secs(1);

/// Who logs in, and where.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    /// Auth method mount path (`jwt`, `kubernetes`, `auth/jwt` is accepted too).
    pub auth_mount: String,
    pub role: String,
    /// Names the identity in logs and errors (no secret).
    pub identity: String,
}

pub use crate::provider::PodJwt;

/// Request counters of one identity (the tests and the benchmark read them).
#[derive(Debug, Default)]
pub struct VaultStats {
    pub logins: AtomicU64,
    pub reads: AtomicU64,
    pub token_renewals: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub revocations: AtomicU64,
}

#[derive(Default)]
struct TokenSlot {
    current: Option<VaultToken>,
    /// The last failed login, with the pod-token generation it used. Callers that were
    /// already waiting, or come within [`LOGIN_RETRY`] with no new pod token, get its error
    /// instead of each trying again (one pod's volume of ten objects costs one rejected login).
    failed: Option<(Instant, u64, ProviderError)>,
}

struct VaultToken {
    secret: SecretBytes,
    /// `None`: the token does not expire.
    expires: Option<Instant>,
    ttl: Duration,
    renewable: bool,
}

impl VaultToken {
    fn left(&self, now: Instant) -> Option<Duration> {
        self.expires.map(|e| e.saturating_duration_since(now))
    }

    fn usable(&self, now: Instant) -> bool {
        self.left(now)
            .is_none_or(|l| l > TOKEN_MIN_LEFT.min(self.ttl / 4))
    }
}

pub struct VaultProvider {
    client: Client,
    login: LoginConfig,
    token: tokio::sync::Mutex<TokenSlot>,
    /// Service-account tokens of the identity's volumes, by volume.
    jwts: Mutex<BTreeMap<String, PodJwt>>,
    /// Bumped whenever a pod token is handed over.
    jwt_generation: AtomicU64,
    engines: Mutex<HashMap<String, Engine>>,
    pub stats: VaultStats,
    stop: CancellationToken,
}

impl std::fmt::Debug for VaultProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultProvider")
            .field("client", &self.client)
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

impl Drop for VaultProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..6])
}

impl VaultProvider {
    /// Sets up the identity's provider and its token-upkeep task (ended by [`Self::revoke`] or
    /// when the provider is dropped).
    pub fn new(endpoint: &Endpoint, login: LoginConfig) -> Result<Arc<Self>, String> {
        let client = Client::new(endpoint)?;
        let this = Arc::new(Self {
            client,
            login: LoginConfig {
                auth_mount: login
                    .auth_mount
                    .trim_matches('/')
                    .trim_start_matches("auth/")
                    .to_owned(),
                ..login
            },
            token: tokio::sync::Mutex::new(TokenSlot::default()),
            jwts: Mutex::new(BTreeMap::new()),
            jwt_generation: AtomicU64::new(0),
            engines: Mutex::new(HashMap::new()),
            stats: VaultStats::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(upkeep(Arc::downgrade(&this), this.stop.clone()));
        Ok(this)
    }

    /// Requests sent to Vault by this identity (logins, reads, renewals, revocations).
    pub fn requests(&self) -> u64 {
        self.client.requests.load(Ordering::Relaxed)
    }

    /// Gives the identity a volume's service-account token (publish, and every republish: kubelet
    /// sends fresh tokens).
    pub fn set_jwt(&self, volume: &str, jwt: PodJwt) {
        crate::provider::keep_jwt(&self.jwts, volume, jwt);
        self.jwt_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets the tokens of volumes for which `keep` is false.
    pub fn retain_jwts(&self, keep: impl Fn(&str) -> bool) {
        self.jwts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|v, _| keep(v));
    }

    /// The pod identity this provider logs in as.
    pub fn identity(&self) -> &str {
        &self.login.identity
    }

    /// Logs the identity out: revokes its Vault token (and so every lease it created) and stops
    /// the upkeep. Called when the identity's last volume is unpublished.
    pub async fn revoke(&self) {
        self.stop.cancel();
        let token = self.token.lock().await.current.take();
        if let Some(t) = token {
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
            match self
                .client
                .call(
                    Method::POST,
                    "auth/token/revoke-self",
                    Some(&t.secret),
                    None,
                )
                .await
            {
                Ok(r) if r.status < 300 => {
                    tracing::info!(identity = %self.login.identity, "Vault token revoked (last volume of the identity)");
                }
                Ok(r) => {
                    tracing::warn!(identity = %self.login.identity, status = r.status, error = %error_text(&r.body, &[t.secret.expose()]), "Vault refused revoke-self; the token ends at its TTL");
                }
                Err(e) => {
                    tracing::warn!(identity = %self.login.identity, error = %e, "cannot revoke the Vault token; it ends at its TTL");
                }
            }
        }
    }

    fn login_path(&self) -> String {
        format!("auth/{}/login", self.login.auth_mount)
    }

    async fn login(&self) -> Result<VaultToken, ProviderError> {
        let now = SystemTime::now();
        let (pod, body) = {
            let jwts = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
            let best = jwts
                .values()
                .filter(|j| j.expires.is_none_or(|e| e > now))
                .max_by_key(|j| j.expires);
            let Some(j) = best else {
                return Err(ProviderError::Unavailable {
                    provider: KIND,
                    detail: format!(
                        "no unexpired service-account token to log in to Vault as {} (kubelet sends fresh ones at republish)",
                        self.login.identity
                    ),
                });
            };
            let body = serde_json::json!({"role": self.login.role, "jwt": j.jwt.as_str()});
            let body = SecretJson(body);
            (j.pod.clone(), (body.to_bytes(), j.jwt.clone()))
        };
        let (body, jwt) = body;
        self.stats.logins.fetch_add(1, Ordering::Relaxed);
        let path = self.login_path();
        let reply = self
            .client
            .call(Method::POST, &path, None, Some(body))
            .await?;
        if reply.status >= 300 {
            let text = error_text(&reply.body, &[jwt.as_bytes()]);
            let detail = format!(
                "Vault rejected the login of {pod} with role {:?} at {path} ({}): {text}",
                self.login.role, reply.status
            );
            return Err(match reply.status {
                400 | 401 | 403 => ProviderError::PermissionDenied {
                    provider: KIND,
                    object: path,
                    code: format!("vault-login-refused-{}", reply.status),
                    detail,
                },
                429 => ProviderError::Throttled {
                    provider: KIND,
                    retry_after: reply.retry_after,
                },
                _ => ProviderError::Unavailable {
                    provider: KIND,
                    detail,
                },
            });
        }
        let auth = serde_json::from_slice::<AuthReply>(reply.body.expose())
            .ok()
            .and_then(|a| a.auth)
            .ok_or_else(|| ProviderError::Unavailable {
                provider: KIND,
                detail: format!("Vault's reply to the login at {path} has no auth token"),
            })?;
        let ttl = Duration::from_secs(auth.lease_duration);
        tracing::info!(identity = %self.login.identity, pod = %pod, ttl_s = ttl.as_secs(), "logged in to Vault");
        Ok(VaultToken {
            secret: SecretBytes::new(auth.client_token.as_bytes().to_vec()),
            expires: (!ttl.is_zero()).then(|| Instant::now() + ttl),
            ttl,
            renewable: auth.renewable,
        })
    }

    /// The identity's Vault token, logging in when there is none or it is nearly over.
    async fn token(&self) -> Result<(SecretBytes, Option<Instant>), ProviderError> {
        let asked = Instant::now();
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.current.as_ref()
            && t.usable(Instant::now())
        {
            return Ok((t.secret.clone(), t.expires));
        }
        let generation = self.jwt_generation.load(Ordering::Relaxed);
        if let Some((at, g, e)) = &slot.failed
            && (*at >= asked || (*g == generation && at.elapsed() < LOGIN_RETRY))
        {
            return Err(e.clone());
        }
        match self.login().await {
            Ok(t) => {
                let out = (t.secret.clone(), t.expires);
                slot.current = Some(t);
                slot.failed = None;
                Ok(out)
            }
            Err(e) => {
                slot.failed = Some((Instant::now(), generation, e.clone()));
                Err(e)
            }
        }
    }

    /// Drops `secret` as the current token if it still is (Vault no longer accepts it).
    async fn forget_token(&self, secret: &SecretBytes) {
        let mut slot = self.token.lock().await;
        if slot.current.as_ref().is_some_and(|t| &t.secret == secret) {
            slot.current = None;
        }
    }

    /// One authenticated call. A 403 is checked with `lookup-self`: when the token itself is no
    /// longer valid (revoked, expired), log in again and retry once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<SecretBytes>,
    ) -> Result<(Reply, Option<Instant>), ProviderError> {
        let (token, expires) = self.token().await?;
        let reply = self
            .client
            .call(method.clone(), path, Some(&token), body.clone())
            .await?;
        if reply.status != 403 {
            return Ok((reply, expires));
        }
        let lookup = self
            .client
            .call(Method::GET, "auth/token/lookup-self", Some(&token), None)
            .await?;
        if lookup.status != 403 {
            return Ok((reply, expires));
        }
        tracing::info!(identity = %self.login.identity, "Vault no longer accepts the identity's token; logging in again");
        self.forget_token(&token).await;
        let (token, expires) = self.token().await?;
        let reply = self.client.call(method, path, Some(&token), body).await?;
        Ok((reply, expires))
    }

    async fn engine(&self, path: &str) -> Result<Engine, ProviderError> {
        let shared_key = format!("{}|{path}", self.client.server_key());
        if let Some(e) = shared_engines()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&shared_key)
            .or(self
                .engines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(path))
        {
            return Ok(e.clone());
        }
        let (reply, _) = self
            .call(Method::GET, &format!("sys/internal/ui/mounts/{path}"), None)
            .await?;
        #[derive(Deserialize)]
        struct Mount {
            data: MountData,
        }
        #[derive(Deserialize)]
        struct MountData {
            path: String,
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            options: Option<HashMap<String, String>>,
        }
        if reply.status == 429 || reply.status >= 500 {
            // Sealed, standby or overloaded: nothing learned, nothing cached.
            return Err(status_error(&reply, path, "looking up the secret engine"));
        }
        let looked_up = reply.status == 200;
        let engine = match serde_json::from_slice::<Mount>(reply.body.expose()) {
            Ok(m) if looked_up => {
                let v2 = m.data.kind == "kv"
                    && m.data
                        .options
                        .as_ref()
                        .and_then(|o| o.get("version"))
                        .is_some_and(|v| v == "2");
                match (m.data.kind.as_str(), v2) {
                    ("kv" | "generic", false) => Engine::KvV1,
                    ("kv", true) => Engine::KvV2 {
                        mount: m.data.path.trim_end_matches('/').to_owned(),
                    },
                    _ => Engine::Other,
                }
            }
            // Unknown to the lookup (or not allowed to look): read the path as given and let
            // that read's answer speak.
            _ => Engine::Other,
        };
        if looked_up {
            // What kind of engine serves a path is not secret and the same for every identity.
            shared_engines()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(shared_key, engine.clone());
        } else {
            self.engines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(path.to_owned(), engine.clone());
        }
        Ok(engine)
    }

    async fn read(&self, req: &ObjectRequest) -> Result<SecretObject, ProviderError> {
        let call = parse_call(req)?;
        let engine = if call.method == Method::GET {
            self.engine(&call.path).await?
        } else {
            Engine::Other
        };
        let invalid = |detail: String| ProviderError::Invalid {
            provider: KIND,
            object: req.name.clone(),
            detail,
        };
        let path = match (&engine, &req.version) {
            (Engine::KvV2 { mount }, v) => {
                let rest = call.path[mount.len()..].trim_start_matches('/');
                let rest = rest.strip_prefix("data/").unwrap_or(rest);
                match v {
                    Some(v) if v.parse::<u64>().is_ok() => {
                        format!("{mount}/data/{rest}?version={v}")
                    }
                    Some(v) => return Err(invalid(format!("version {v:?} is not a number"))),
                    None => format!("{mount}/data/{rest}"),
                }
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "a version can be pinned only for KV version 2 secrets".into(),
                ));
            }
            _ => call.path.clone(),
        };
        let body = call.args.as_ref().map(json_bytes);
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let (reply, token_expires) = self.call(call.method.clone(), &path, body).await?;
        if reply.status >= 300 {
            return Err(status_error(
                &reply,
                &req.name,
                &format!("reading as {}", self.login.identity),
            ));
        }
        let token_left = token_expires.map(|e| e.saturating_duration_since(Instant::now()));
        object_from_reply(&engine, reply.body.expose(), &req.name, token_left)
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Lease, ProviderError> {
        self.stats.lease_renewals.fetch_add(1, Ordering::Relaxed);
        let body = json_bytes(&serde_json::json!({"lease_id": lease.id}));
        let (reply, token_expires) = self
            .call(Method::PUT, "sys/leases/renew", Some(body))
            .await?;
        if reply.status >= 300 {
            return Err(status_error(
                &reply,
                "sys/leases/renew",
                &format!("renewing a lease as {}", self.login.identity),
            ));
        }
        let l: LeaseReply = serde_json::from_slice(reply.body.expose()).map_err(|_| {
            ProviderError::Unavailable {
                provider: KIND,
                detail: "Vault's reply to a lease renewal has no lease".into(),
            }
        })?;
        let token_left = token_expires.map(|e| e.saturating_duration_since(Instant::now()));
        Ok(Lease {
            id: lease.id.clone(),
            duration: cap(Duration::from_secs(l.lease_duration), token_left),
            renewable: l.renewable,
        })
    }

    async fn revoke_lease(&self, lease: &Lease) {
        self.stats.revocations.fetch_add(1, Ordering::Relaxed);
        let body = json_bytes(&serde_json::json!({"lease_id": lease.id}));
        match self
            .call(Method::PUT, "sys/leases/revoke", Some(body))
            .await
        {
            Ok((r, _)) if r.status < 300 => {
                tracing::info!(identity = %self.login.identity, lease = %short_hash(&lease.id), "lease revoked (no volume uses it)");
            }
            Ok((r, _)) => {
                tracing::warn!(identity = %self.login.identity, status = r.status, error = %error_text(&r.body, &[]), "Vault refused to revoke a lease; it ends with the identity's token or its TTL (the role's policy needs update on sys/leases/revoke)");
            }
            Err(e) => {
                tracing::warn!(identity = %self.login.identity, error = %e, "cannot revoke a lease; it ends with the identity's token or its TTL");
            }
        }
    }

    /// Background token upkeep: renew at 2/3 of the TTL; when that fails or no longer extends
    /// the token, log in again (if a pod token is at hand).
    async fn maintain(&self) -> Option<Instant> {
        let mut slot = self.token.lock().await;
        let t = slot.current.as_ref()?;
        let now = Instant::now();
        let left = t.left(now)?;
        let due = t.expires? - t.ttl / 3;
        if now < due {
            return Some(due);
        }
        if t.renewable {
            self.stats.token_renewals.fetch_add(1, Ordering::Relaxed);
            let r = self
                .client
                .call(Method::POST, "auth/token/renew-self", Some(&t.secret), None)
                .await;
            if let Ok(r) = r
                && r.status < 300
                && let Some(auth) = serde_json::from_slice::<AuthReply>(r.body.expose())
                    .ok()
                    .and_then(|a| a.auth)
            {
                let new_left = Duration::from_secs(auth.lease_duration);
                if new_left > left + Duration::from_secs(1) {
                    let t = slot.current.as_mut()?;
                    t.expires = Some(now + new_left);
                    t.ttl = new_left;
                    return Some(now + new_left * 2 / 3);
                }
            }
        }
        // Not renewable any more: a new login while the old token still works.
        match self.login().await {
            Ok(t) => {
                let next = t.expires.map(|e| e - t.ttl / 3);
                slot.current = Some(t);
                next
            }
            Err(e) => {
                tracing::warn!(identity = %self.login.identity, error = %e, "cannot replace the Vault token before it ends; retrying");
                Some(now + (left / 4).max(Duration::from_secs(1)))
            }
        }
    }
}

/// Secret engine types by server and path, learned by any identity.
fn shared_engines() -> &'static Mutex<HashMap<String, Engine>> {
    static ENGINES: std::sync::OnceLock<Mutex<HashMap<String, Engine>>> =
        std::sync::OnceLock::new();
    ENGINES.get_or_init(Default::default)
}

fn cap(d: Duration, limit: Option<Duration>) -> Duration {
    match limit {
        Some(l) => d.min(l),
        None => d,
    }
}

async fn upkeep(this: Weak<VaultProvider>, stop: CancellationToken) {
    let mut next = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let Some(p) = this.upgrade() else { return };
        next = p
            .maintain()
            .await
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .max(Instant::now() + Duration::from_millis(500));
    }
}

impl Provider for VaultProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn fetch<'a>(
        &'a self,
        req: &'a ObjectRequest,
    ) -> BoxFuture<'a, Result<SecretObject, ProviderError>> {
        Box::pin(self.read(req))
    }

    fn renew<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<Lease, ProviderError>> {
        Box::pin(self.renew_lease(lease))
    }

    fn release<'a>(&'a self, object: &'a SecretObject) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(l) = &object.lease {
                self.revoke_lease(l).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the vault_replies fuzz target (10-minute run): a PKI `expiration` past what
    /// SystemTime holds panicked while adding it to the epoch.
    #[test]
    fn an_expiration_past_what_the_clock_holds_is_no_expiry() {
        let body = br#"{"data":{"n":1920000000,"sri":["a","b"],"expiration":10000000001263207793,"er":"2a:2b"}}"#;
        let obj = object_from_reply(&Engine::Other, body, "pki/issue/x", None).unwrap();
        assert_eq!(obj.expiry, None);
        let body = br#"{"data":{"expiration":18446744073709551615}}"#;
        assert!(object_from_reply(&Engine::Other, body, "pki/issue/x", None).is_ok());
    }

    #[test]
    fn paths_from_pods_are_checked() {
        for ok in [
            "secret/db",
            "secret/data/team-a/db",
            "database/creds/app",
            "pki/issue/web",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/secret/db",
            "secret/db/",
            "secret//db",
            "secret/../sys/policy",
            "secret/./db",
            "secret/db?version=1",
            "secret/db#x",
            "secret/%2e%2e/x",
            "secret/d b",
            "secret\\db",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn params_are_canonical_and_checked() {
        assert_eq!(encode_params("get", None).unwrap(), None);
        let args = serde_json::json!({"common_name": "a.example", "ttl": "1h"});
        let a = encode_params("post", Some(&args)).unwrap().unwrap();
        assert_eq!(a, encode_params("POST", Some(&args)).unwrap().unwrap());
        let call = parse_call(&ObjectRequest {
            name: "pki/issue/web".into(),
            version: None,
            params: Some(a),
        })
        .unwrap();
        assert_eq!(call.method, Method::POST);
        assert_eq!(call.args, Some(args));
        assert!(encode_params("DELETE", None).is_err());
        assert!(encode_params("GET", Some(&serde_json::json!({"a": 1}))).is_err());
        assert!(encode_params("PUT", Some(&serde_json::json!([1]))).is_err());
    }

    #[test]
    fn leases_never_outlive_the_token() {
        assert_eq!(
            cap(Duration::from_secs(3600), Some(Duration::from_secs(600))),
            Duration::from_secs(600)
        );
        assert_eq!(cap(Duration::from_secs(60), None), Duration::from_secs(60));
    }
}
