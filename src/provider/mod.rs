//! Providers: where secret objects come from.
//!
//! A [`Provider`] fetches one object for one identity. It knows nothing of volumes, caching or
//! rotation timing (see [`crate::cache`] and [`crate::rotation`]); it reports the version and
//! lease it got so the scheduler can decide when to come back.

pub mod azure;
pub mod local;
pub mod vault;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::secret::{Lease, SecretObject};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A pod's service-account token as kubelet handed it over (publish and every republish), for
/// a provider that acts as the pod (Vault login, Entra exchange).
pub struct PodJwt {
    /// The pod, for errors ("pod ns/name (service account sa)").
    pub pod: String,
    pub jwt: zeroize::Zeroizing<String>,
    pub expires: Option<std::time::SystemTime>,
}

/// Keeps `jwt` for `volume` in `map` and drops the tokens that have expired (provider mode
/// never unpublishes, so this is what bounds the map there).
pub fn keep_jwt(
    map: &std::sync::Mutex<std::collections::BTreeMap<String, PodJwt>>,
    volume: &str,
    jwt: PodJwt,
) {
    let now = std::time::SystemTime::now();
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    m.retain(|_, j| j.expires.is_none_or(|e| e > now));
    m.insert(volume.to_owned(), jwt);
}

/// What to fetch: an object name as the provider knows it, optionally pinned to a version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRequest {
    pub name: String,
    pub version: Option<String>,
    /// Provider-specific request parameters in a canonical text form (Vault: the `method` and
    /// `secretArgs` of a write-style read such as PKI `issue`). `None` for a plain read.
    pub params: Option<String>,
}

/// A provider of secret objects. Implementations must be cheap to call concurrently.
pub trait Provider: Send + Sync + 'static {
    /// A short name for logs, metrics and the audit log ("local", "vault", "azure").
    fn kind(&self) -> &'static str;

    /// Fetches one object. Errors name the object and say what to fix; they never carry a value
    /// or a credential.
    fn fetch<'a>(
        &'a self,
        req: &'a ObjectRequest,
    ) -> BoxFuture<'a, Result<SecretObject, ProviderError>>;

    /// Renews a lease this provider handed out; returns the lease as it now stands. Providers
    /// without renewable leases never get this call.
    fn renew<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<Lease, ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::Invalid {
                provider: self.kind(),
                object: lease.id.clone(),
                detail: "this provider cannot renew leases".into(),
            })
        })
    }

    /// Gives back a value no volume uses any more (revokes its lease). Best effort: failures
    /// are logged by the provider, the lease then ends on its own.
    fn release<'a>(&'a self, _object: &'a SecretObject) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// A channel that ticks when the provider knows its objects changed (file watches); `None`
    /// when the provider can only be polled.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Why a fetch failed. `Clone` because one failed fetch is reported to every waiter of a
/// single-flight group.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("object \"{object}\" was not found at the {provider} provider")]
    NotFound {
        provider: &'static str,
        object: String,
    },
    #[error("the {provider} provider refused access to \"{object}\" ({code}): {detail}")]
    PermissionDenied {
        provider: &'static str,
        object: String,
        /// The provider's reason, short and stable (e.g. `vault-login-refused`, an AADSTS
        /// code): what the audit record's `reason` carries.
        code: String,
        detail: String,
    },
    #[error("the {provider} provider is throttling requests; retry after {retry_after:?}")]
    Throttled {
        provider: &'static str,
        retry_after: Option<Duration>,
    },
    #[error("the {provider} provider is unavailable: {detail}")]
    Unavailable {
        provider: &'static str,
        detail: String,
    },
    #[error("object \"{object}\" at the {provider} provider is not usable: {detail}")]
    Invalid {
        provider: &'static str,
        object: String,
        detail: String,
    },
}

impl ProviderError {
    /// Whether waiting and trying again may help (throttling, outages); a permanent error is
    /// still retried by rotation, but reported as a configuration problem.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Unavailable { .. })
    }

    /// The wait a provider asked for (HTTP `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
