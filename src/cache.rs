//! The shared fetch cache: one value per (identity, provider, object, version request) on the
//! node, single-flight, with the refresh and retry deadlines computed by [`crate::rotation`].
//!
//! N volumes asking for the same object in the same refresh cycle cost one provider fetch: the
//! first caller fetches, concurrent callers wait for its outcome, later callers get the cached
//! value until its refresh deadline. When a refresh fails the last good value keeps being served
//! (marked stale) and the provider is not asked again before the backoff deadline.
//!
//! A value with a renewable lease (Vault dynamic credentials) is renewed in place when the
//! rotation rules say so: the caller's closure is asked for [`Work::Renew`] instead of
//! [`Work::Fetch`], and the value stays the same. When a renewal fails or stops extending the
//! lease, the next due step is a fresh fetch.
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
use crate::secret::{Expiry, Lease, SecretObject};

/// What the cache asks its caller to do for a due value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Fetch,
    /// Renew this lease of the current value (the value itself stays).
    Renew(Lease),
}

/// What the caller did.
#[derive(Debug)]
pub enum Done {
    Fetched(SecretObject),
    /// The lease was renewed: the lease as the provider now reports it.
    Renewed(Lease),
}

/// Which value: whose credential, which provider, which object and version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    /// A non-secret identity key ("local", "vault:jwt/role", "azure:tenant/client").
    pub identity: String,
    pub provider: &'static str,
    pub object: ObjectRequest,
    /// Empty when the value is shared by every volume of the identity; a volume id when the
    /// volume asked for its own (dynamic credentials per volume).
    pub scope: String,
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
    pub renewals: AtomicU64,
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
    /// What to do at `refresh_at`.
    renew: Option<Lease>,
    /// When the current lease ends (leased values only).
    lease_end: Option<Instant>,
}

impl Current {
    fn new(object: Arc<SecretObject>, now: Instant, poll: Duration) -> Self {
        let validity = validity_of(&object);
        let next = rotation::next(validity, poll, fastrand::f64());
        Self {
            renew: match next {
                rotation::Next::Renew(_) => object.lease.clone(),
                rotation::Next::Refetch(_) => None,
            },
            lease_end: object.lease.as_ref().map(|l| now + l.duration),
            refresh_at: now + next.delay(),
            object,
        }
    }

    /// Takes a renewed lease: renew again or plan the replacement, per the rotation rules.
    fn renewed(&mut self, lease: Lease, now: Instant, poll: Duration) {
        let end = now + lease.duration;
        // A renewal that does not move the end by at least a second has hit the max TTL.
        let extended = self
            .lease_end
            .is_none_or(|old| end > old + Duration::from_secs(1));
        let next = rotation::next(
            Validity::RenewableLease {
                remaining: lease.duration,
                extended,
            },
            poll,
            fastrand::f64(),
        );
        self.lease_end = Some(end);
        self.refresh_at = now + next.delay();
        self.renew = match next {
            rotation::Next::Renew(_) => Some(lease),
            rotation::Next::Refetch(_) => None,
        };
    }
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
    Lead(watch::Sender<bool>, Work),
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

    /// The current value of `key`, fetching it with `fetch` when it is missing or due (a due
    /// renewal is done as a fetch).
    pub async fn get<F, Fut>(&self, key: &CacheKey, fetch: F) -> Result<Fetched, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SecretObject, ProviderError>>,
    {
        self.get_or_renew(key, |_| async { fetch().await.map(Done::Fetched) })
            .await
    }

    /// The current value of `key`; when it is missing or due, `work` is called once (for all
    /// concurrent callers) to fetch it or to renew its lease.
    pub async fn get_or_renew<F, Fut>(
        &self,
        key: &CacheKey,
        work: F,
    ) -> Result<Fetched, ProviderError>
    where
        F: FnOnce(Work) -> Fut,
        Fut: Future<Output = Result<Done, ProviderError>>,
    {
        let (tx, job) = loop {
            match self.step(key) {
                Step::Done(r) => return r,
                Step::Lead(tx, job) => break (tx, job),
                // The leader finished (or was cancelled): look at the slot again.
                Step::Wait(mut rx) => {
                    let _ = rx.wait_for(|done| *done).await;
                }
            }
        };
        let guard = InflightGuard { cache: self, key };
        match &job {
            Work::Fetch => self.stats.provider_fetches.fetch_add(1, Ordering::Relaxed),
            Work::Renew(_) => self.stats.renewals.fetch_add(1, Ordering::Relaxed),
        };
        let renewing = matches!(job, Work::Renew(_));
        let result = work(job).await;
        let now = Instant::now();
        let out = {
            let mut slots = self.lock();
            let slot = slots.entry(key.clone()).or_default();
            slot.inflight = None;
            match (result, slot.current.as_mut()) {
                (Ok(Done::Renewed(lease)), Some(cur)) => {
                    cur.renewed(lease, now, self.poll);
                    slot.failures = 0;
                    slot.retry_at = None;
                    slot.last_error = None;
                    Ok(Fetched {
                        object: cur.object.clone(),
                        fetched: false,
                        stale: None,
                    })
                }
                (Err(e), Some(cur)) if renewing => {
                    // The lease could not be renewed: keep serving the value (its lease has
                    // not ended) and replace it at once, with the usual backoff if that fails.
                    tracing::warn!(object = %key.object.name, error = %e, "lease renewal failed; fetching a new secret");
                    cur.renew = None;
                    cur.refresh_at = now;
                    Ok(Fetched {
                        object: cur.object.clone(),
                        fetched: false,
                        stale: None,
                    })
                }
                (Ok(Done::Renewed(_)), None) => Err(ProviderError::Unavailable {
                    provider: key.provider,
                    detail: "a lease was renewed for a value that is no longer cached".into(),
                }),
                (Ok(Done::Fetched(obj)), _) => {
                    let obj = Arc::new(obj);
                    slot.current = Some(Current::new(obj.clone(), now, self.poll));
                    slot.failures = 0;
                    slot.retry_at = None;
                    slot.last_error = None;
                    Ok(Fetched {
                        object: obj,
                        fetched: true,
                        stale: None,
                    })
                }
                (Err(e), _) => {
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
        let job = match slot.current.as_ref().and_then(|c| c.renew.clone()) {
            Some(lease) => Work::Renew(lease),
            None => Work::Fetch,
        };
        let (tx, rx) = watch::channel(false);
        slot.inflight = Some(rx);
        Step::Lead(tx, job)
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

    /// Drops every value for which `keep` is false and hands back those that had a value, so
    /// the caller can release their leases; they are zeroized when the caller drops them.
    pub fn retain(&self, keep: impl Fn(&CacheKey) -> bool) -> Vec<(CacheKey, Arc<SecretObject>)> {
        let mut evicted = Vec::new();
        self.lock().retain(|k, s| {
            let keep = s.inflight.is_some() || keep(k);
            if !keep && let Some(cur) = s.current.take() {
                evicted.push((k.clone(), cur.object));
            }
            keep
        });
        evicted
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
    let left = |t: SystemTime| t.duration_since(SystemTime::now()).unwrap_or_default();
    match obj.expiry {
        // A value issued for us (a PKI certificate) wins over a lease: reissue at 90% of its
        // lifetime.
        Some(Expiry::Issued(end)) => {
            let remaining = left(end);
            return Validity::Expires {
                lifetime: remaining,
                remaining,
            };
        }
        // A stored object (Key Vault) is polled; its expiry can only bring the poll forward.
        Some(Expiry::Stored(end)) if obj.lease.is_none() => {
            return Validity::PolledUntil {
                remaining: left(end),
            };
        }
        _ => {}
    }
    match &obj.lease {
        Some(lease) if lease.renewable => Validity::RenewableLease {
            remaining: lease.duration,
            extended: true,
        },
        Some(lease) => Validity::Lease {
            remaining: lease.duration,
        },
        None => Validity::Unleased,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretBytes;
    use std::sync::atomic::AtomicUsize;

    fn key(name: &str) -> CacheKey {
        CacheKey {
            identity: "local".into(),
            scope: String::new(),
            provider: "local",
            object: ObjectRequest {
                name: name.into(),
                version: None,
                params: None,
            },
        }
    }

    fn value(v: &str) -> SecretObject {
        SecretObject {
            value: SecretBytes::new(v.as_bytes().to_vec()),
            version: v.into(),
            content_type: None,
            expiry: None,
            lease: None,
        }
    }

    fn leased(v: &str, secs: u64) -> SecretObject {
        SecretObject {
            lease: Some(Lease {
                id: format!("db/creds/app/{v}"),
                duration: Duration::from_secs(secs),
                renewable: true,
            }),
            ..value(v)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewable_leases_are_renewed_in_place_then_replaced_at_max_ttl() {
        let cache = FetchCache::new(Duration::from_secs(120));
        let first = cache
            .get_or_renew(&key("db"), |w| async move {
                assert_eq!(w, Work::Fetch);
                Ok(Done::Fetched(leased("v1", 30)))
            })
            .await
            .unwrap();
        assert!(first.fetched);
        // Renewal at 2/3 of 30 s minus a 10-20% grace: between 14 and 17 s.
        tokio::time::advance(Duration::from_secs(13)).await;
        cache
            .get_or_renew(&key("db"), |_| async { panic!("not due yet") })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let r = cache
            .get_or_renew(&key("db"), |w| async move {
                let Work::Renew(l) = w else { panic!("{w:?}") };
                assert_eq!(l.id, "db/creds/app/v1");
                Ok(Done::Renewed(Lease {
                    duration: Duration::from_secs(30),
                    ..l
                }))
            })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v1", "a renewal keeps the value");
        assert_eq!(cache.stats.renewals.load(Ordering::SeqCst), 1);
        // The next renewal does not move the end (max TTL): the value is replaced before the
        // lease ends, never after.
        tokio::time::advance(Duration::from_secs(18)).await;
        cache
            .get_or_renew(&key("db"), |w| async move {
                let Work::Renew(l) = w else { panic!("{w:?}") };
                Ok(Done::Renewed(Lease {
                    duration: Duration::from_secs(12),
                    ..l
                }))
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        let r = cache
            .get_or_renew(&key("db"), |w| async move {
                assert_eq!(w, Work::Fetch, "past max TTL the secret is replaced");
                Ok(Done::Fetched(leased("v2", 30)))
            })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_value_and_fetches_next() {
        let cache = FetchCache::new(Duration::from_secs(120));
        cache
            .get_or_renew(&key("db"), |_| async {
                Ok(Done::Fetched(leased("v1", 30)))
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(18)).await;
        let r = cache
            .get_or_renew(&key("db"), |_| async {
                Err(ProviderError::Unavailable {
                    provider: "vault",
                    detail: "lease not found".into(),
                })
            })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v1");
        let r = cache
            .get_or_renew(&key("db"), |w| async move {
                assert_eq!(w, Work::Fetch);
                Ok(Done::Fetched(leased("v2", 30)))
            })
            .await
            .unwrap();
        assert_eq!(r.object.version, "v2");
    }

    #[test]
    fn eviction_hands_back_the_values() {
        let cache = FetchCache::new(Duration::from_secs(120));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            for n in ["a", "b"] {
                cache
                    .get(&key(n), || async { Ok(leased(n, 30)) })
                    .await
                    .unwrap();
            }
        });
        let evicted = cache.retain(|k| k.object.name == "a");
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].1.version, "b");
        assert_eq!(cache.len(), 1);
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
