//! The shared fetch cache: one value per (identity, provider, object, version request) on the
//! node, single-flight, with the refresh and retry deadlines computed by [`crate::rotation`].
//!
//! N volumes asking for the same object in the same refresh cycle cost one provider fetch: the
//! first caller fetches, concurrent callers wait for its outcome, later callers get the cached
//! value until its refresh deadline. When a refresh fails the last good value keeps being served
//! (marked stale) and the provider is not asked again before the backoff deadline.
//!
//! What this module does not do: decide *what* a volume needs, or talk to a provider directly
//! (the caller passes the fetch as a closure).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::provider::{ObjectRequest, ProviderError};
use crate::rotation::{self, Validity};
use crate::secret::SecretObject;

/// Which value: whose credential, which provider, which object and version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    /// A non-secret identity key ("local", "vault:jwt/role", "azure:tenant/client").
    pub identity: String,
    pub provider: &'static str,
    pub object: ObjectRequest,
}

/// The outcome of [`FetchCache::get`].
#[derive(Clone, Debug)]
pub struct Fetched {
    pub object: Arc<SecretObject>,
    /// True when this call's flight went to the provider (false: served from the cache).
    pub fetched: bool,
    /// Set when the last refresh failed and this is the last good value.
    pub stale: Option<ProviderError>,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub provider_fetches: AtomicU64,
    pub hits: AtomicU64,
    pub stale_served: AtomicU64,
    pub failures: AtomicU64,
}

#[derive(Default)]
struct Slot {
    current: Option<Current>,
    inflight: Option<watch::Receiver<bool>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ProviderError>,
}

struct Current {
    object: Arc<SecretObject>,
    refresh_at: Instant,
}

pub struct FetchCache {
    slots: Mutex<HashMap<CacheKey, Slot>>,
    poll: Duration,
    pub stats: CacheStats,
}

impl std::fmt::Debug for FetchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchCache")
            .field("entries", &self.lock().len())
            .field("poll", &self.poll)
            .finish()
    }
}

enum Step {
    Done(Result<Fetched, ProviderError>),
    Wait(watch::Receiver<bool>),
    Lead(watch::Sender<bool>),
}

impl FetchCache {
    /// `poll` is the refresh interval of values without a lease.
    pub fn new(poll: Duration) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            poll,
            stats: CacheStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Slot>> {
        // A panic while holding this lock cannot leave a slot half-updated in a way that matters
        // (each update is a few field stores), so a poisoned lock is still used.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current value of `key`, fetching it with `fetch` when it is missing or due.
    pub async fn get<F, Fut>(&self, key: &CacheKey, fetch: F) -> Result<Fetched, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SecretObject, ProviderError>>,
    {
        let tx = loop {
            match self.step(key) {
                Step::Done(r) => return r,
                Step::Lead(tx) => break tx,
                // The leader finished (or was cancelled): look at the slot again.
                Step::Wait(mut rx) => {
                    let _ = rx.wait_for(|done| *done).await;
                }
            }
        };
        let guard = InflightGuard { cache: self, key };
        self.stats.provider_fetches.fetch_add(1, Ordering::Relaxed);
        let result = fetch().await;
        let now = Instant::now();
        let out = {
            let mut slots = self.lock();
            let slot = slots.entry(key.clone()).or_default();
            slot.inflight = None;
            match result {
                Ok(obj) => {
                    let obj = Arc::new(obj);
                    let delay =
                        rotation::next(validity_of(&obj), self.poll, fastrand::f64()).delay();
                    slot.current = Some(Current {
                        object: obj.clone(),
                        refresh_at: now + delay,
                    });
                    slot.failures = 0;
                    slot.retry_at = None;
                    slot.last_error = None;
                    Ok(Fetched {
                        object: obj,
                        fetched: true,
                        stale: None,
                    })
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    slot.failures += 1;
                    slot.retry_at = Some(
                        now + rotation::backoff(slot.failures, e.retry_after(), fastrand::f64()),
                    );
                    slot.last_error = Some(e.clone());
                    match &slot.current {
                        Some(cur) => {
                            self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                            Ok(Fetched {
                                object: cur.object.clone(),
                                fetched: true,
                                stale: Some(e),
                            })
                        }
                        None => Err(e),
                    }
                }
            }
        };
        std::mem::forget(guard);
        let _ = tx.send(true);
        out
    }

    fn step(&self, key: &CacheKey) -> Step {
        let now = Instant::now();
        let mut slots = self.lock();
        let slot = slots.entry(key.clone()).or_default();
        if let Some(cur) = &slot.current {
            if now < cur.refresh_at {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Step::Done(Ok(Fetched {
                    object: cur.object.clone(),
                    fetched: false,
                    stale: None,
                }));
            }
            if slot.retry_at.is_some_and(|r| now < r) {
                self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                return Step::Done(Ok(Fetched {
                    object: cur.object.clone(),
                    fetched: false,
                    stale: slot.last_error.clone(),
                }));
            }
        } else if slot.retry_at.is_some_and(|r| now < r)
            && let Some(e) = &slot.last_error
        {
            return Step::Done(Err(e.clone()));
        }
        if let Some(rx) = &slot.inflight {
            return Step::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        slot.inflight = Some(rx);
        Step::Lead(tx)
    }

    /// Makes every value of `provider` due now and forgets its backoff (the provider reported a
    /// change, so a fix may be there).
    pub fn expire_provider(&self, provider: &str) {
        let now = Instant::now();
        for (k, slot) in self.lock().iter_mut() {
            if k.provider == provider {
                if let Some(cur) = &mut slot.current {
                    cur.refresh_at = now;
                }
                slot.retry_at = None;
            }
        }
    }

    /// The earliest moment any of `keys` is due for a refresh or a retry.
    pub fn next_due<'a>(&self, keys: impl IntoIterator<Item = &'a CacheKey>) -> Option<Instant> {
        let slots = self.lock();
        keys.into_iter()
            .filter_map(|k| slots.get(k))
            .filter_map(|s| match (&s.current, s.retry_at) {
                (_, Some(r)) => Some(r),
                (Some(c), None) => Some(c.refresh_at),
                (None, None) => None,
            })
            .min()
    }

    /// Drops (and so zeroizes) every value for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&CacheKey) -> bool) {
        self.lock().retain(|k, s| s.inflight.is_some() || keep(k));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Clears the in-flight marker if the leader's future is dropped before it finished, so that
/// waiters take over instead of waiting forever.
struct InflightGuard<'a> {
    cache: &'a FetchCache,
    key: &'a CacheKey,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.cache.lock().get_mut(self.key) {
            slot.inflight = None;
        }
    }
}

/// How long a fetched value stays good, as the rotation rules see it.
pub fn validity_of(obj: &SecretObject) -> Validity {
    if let Some(lease) = &obj.lease {
        // Renewal itself is a provider operation (Vault); until a provider renews, a renewable
        // lease is refetched like a non-renewable one, which is always safe.
        return Validity::Lease {
            remaining: lease.duration,
        };
    }
    if let Some(exp) = obj.expires_at {
        let remaining = exp.duration_since(SystemTime::now()).unwrap_or_default();
        return Validity::Expires {
            lifetime: remaining,
            remaining,
        };
    }
    Validity::Unleased
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretBytes;
    use std::sync::atomic::AtomicUsize;

    fn key(name: &str) -> CacheKey {
        CacheKey {
            identity: "local".into(),
            provider: "local",
            object: ObjectRequest {
                name: name.into(),
                version: None,
            },
        }
    }

    fn value(v: &str) -> SecretObject {
        SecretObject {
            value: SecretBytes::new(v.as_bytes().to_vec()),
            version: v.into(),
            content_type: None,
            expires_at: None,
            lease: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(FetchCache::new(Duration::from_secs(60)));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key("a"), || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(value("v1"))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().object.version, "v1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.provider_fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_after_poll_and_keeps_last_good_on_failure() {
        let cache = FetchCache::new(Duration::from_secs(10));
        cache
            .get(&key("a"), || async { Ok(value("v1")) })
            .await
            .unwrap();
        // Within the poll interval: a hit, the fetch is not called.
        let r = cache
            .get(&key("a"), || async { panic!("must not fetch") })
            .await
            .unwrap();
        assert!(!r.fetched);
        tokio::time::advance(Duration::from_secs(12)).await;
        let unavailable = ProviderError::Unavailable {
            provider: "local",
            detail: "down".into(),
        };
        let e = unavailable.clone();
        let r = cache
            .get(&key("a"), || async move { Err(e) })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v1");
        assert_eq!(r.stale, Some(unavailable.clone()));
        // During the backoff the provider is not asked again.
        let r = cache
            .get(&key("a"), || async { panic!("must back off") })
            .await
            .unwrap();
        assert!(r.stale.is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        let r = cache
            .get(&key("a"), || async { Ok(value("v2")) })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v2");
        assert!(r.stale.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn first_fetch_failure_is_an_error_and_is_not_retried_in_a_loop() {
        let cache = FetchCache::new(Duration::from_secs(10));
        let e = ProviderError::Throttled {
            provider: "local",
            retry_after: Some(Duration::from_secs(5)),
        };
        let e2 = e.clone();
        assert_eq!(
            cache
                .get(&key("a"), || async move { Err(e2) })
                .await
                .unwrap_err(),
            e
        );
        // Retry-After 5 s: asking again at 4 s gets the remembered error without a fetch.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            cache
                .get(&key("a"), || async { panic!("must honour Retry-After") })
                .await
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            cache
                .get(&key("a"), || async { Ok(value("v1")) })
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_hands_over_to_a_waiter() {
        let cache = Arc::new(FetchCache::new(Duration::from_secs(10)));
        let c = cache.clone();
        let leader = tokio::spawn(async move {
            c.get(&key("a"), || async {
                tokio::time::sleep(Duration::from_secs(100)).await;
                Ok(value("never"))
            })
            .await
        });
        tokio::time::advance(Duration::from_millis(10)).await;
        let c = cache.clone();
        let waiter =
            tokio::spawn(async move { c.get(&key("a"), || async { Ok(value("v1")) }).await });
        tokio::time::advance(Duration::from_millis(10)).await;
        leader.abort();
        let r = waiter.await.unwrap().unwrap();
        assert_eq!(r.object.version, "v1");
    }

    #[tokio::test(start_paused = true)]
    async fn expire_provider_forces_a_refetch() {
        let cache = FetchCache::new(Duration::from_secs(600));
        cache
            .get(&key("a"), || async { Ok(value("v1")) })
            .await
            .unwrap();
        cache.expire_provider("local");
        let r = cache
            .get(&key("a"), || async { Ok(value("v2")) })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v2");
        cache.retain(|_| false);
        assert!(cache.is_empty());
    }
}
