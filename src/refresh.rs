//! Keeping one volume fresh: fetch its objects (through the shared cache, in parallel), render
//! its files, hand them to the volume, and audit what happened.
//!
//! A failed refresh never takes content away: the volume keeps its last good files, the failure
//! is logged and audited, and the cache's backoff decides when the provider is asked again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event, EventKind, Outcome, PodRef};
use crate::cache::{CacheKey, Done, FetchCache, Work};
use crate::provider::{ObjectRequest, Provider, ProviderError};
use crate::secret::SecretObject;
use crate::volume::Volume;
use crate::volume::content::{ContentError, RenderedFile, VolumeContent};

/// Shortest pause between two refresh cycles of one volume, whatever the deadlines say.
const MIN_CYCLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Content(#[from] ContentError),
}

/// The files of a volume as rendered, and whether any came from a stale value.
pub struct Rendered {
    pub files: Vec<RenderedFile>,
    pub stale: Vec<(String, ProviderError)>,
}

pub struct Refresher {
    pub volume_id: String,
    content: VolumeContent,
    provider: Arc<dyn Provider>,
    identity: String,
    /// Empty: values shared by the identity's volumes; otherwise this volume's own.
    scope: String,
    cache: Arc<FetchCache>,
    audit: AuditLog,
    /// Versions of the files last applied, by file name (for rotate records).
    applied: BTreeMap<String, String>,
    pod: Option<PodRef>,
    status: Arc<RefreshStatus>,
}

/// What a volume's refresher reports to metrics.
#[derive(Debug, Default)]
pub struct RefreshStatus {
    /// Unix seconds of the last refresh that got every value fresh from cache or provider.
    pub last_ok: std::sync::atomic::AtomicU64,
    pub rotations: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

impl RefreshStatus {
    fn ok_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_ok
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Refresher {
    pub fn new(
        volume_id: impl Into<String>,
        content: VolumeContent,
        provider: Arc<dyn Provider>,
        identity: impl Into<String>,
        cache: Arc<FetchCache>,
        audit: AuditLog,
    ) -> Self {
        Self {
            volume_id: volume_id.into(),
            content,
            provider,
            identity: identity.into(),
            scope: String::new(),
            cache,
            audit,
            applied: BTreeMap::new(),
            pod: None,
            status: Arc::new(RefreshStatus::default()),
        }
    }

    /// Gives this volume its own values (dynamic credentials per volume) instead of sharing
    /// them with the other volumes of the identity.
    pub fn with_own_values(mut self) -> Self {
        self.scope = self.volume_id.clone();
        self
    }

    /// Names the pod in every audit record of this volume (node mode).
    pub fn with_pod(mut self, pod: PodRef) -> Self {
        self.pod = Some(pod);
        self
    }

    pub fn status(&self) -> Arc<RefreshStatus> {
        self.status.clone()
    }

    fn event(&self, kind: EventKind) -> Event {
        let mut e = Event::new(kind).volume(self.volume_id.clone());
        e.pod = self.pod.clone();
        e
    }

    fn key(&self, object: ObjectRequest) -> CacheKey {
        CacheKey {
            identity: self.identity.clone(),
            provider: self.provider.kind(),
            object,
            scope: self.scope.clone(),
        }
    }

    pub fn keys(&self) -> Vec<CacheKey> {
        self.content
            .objects()
            .into_iter()
            .map(|o| self.key(o))
            .collect()
    }

    /// Fetches every object this volume needs (in parallel, deduplicated by the cache) and
    /// renders the files.
    pub async fn render(&self) -> Result<Rendered, RefreshError> {
        let mut tasks = tokio::task::JoinSet::new();
        for key in self.keys() {
            let cache = self.cache.clone();
            let provider = self.provider.clone();
            let audit = self.audit.clone();
            let template = self.event(EventKind::Fetch);
            let identity = self.identity.clone();
            tasks.spawn(async move {
                let fetched = cache
                    .get_or_renew(&key, |work| async {
                        let started = Instant::now();
                        let ev = template
                            .identity(identity)
                            .provider(provider.kind())
                            .object(key.object.name.clone());
                        let (res, ev) = match work {
                            Work::Fetch => {
                                let res = provider.fetch(&key.object).await;
                                let ev = match &res {
                                    Ok(o) => ev.version(o.version.clone()),
                                    Err(e) => ev.error(e),
                                };
                                (res.map(Done::Fetched), ev)
                            }
                            Work::Renew(lease) => {
                                let res = provider.renew(&lease).await;
                                let ev = match &res {
                                    Ok(l) => ev.detail(format!(
                                        "lease renewed for {} s",
                                        l.duration.as_secs()
                                    )),
                                    Err(e) => ev.detail("lease renewal failed").error(e),
                                };
                                (res.map(Done::Renewed), ev)
                            }
                        };
                        audit.record(ev.latency(started.elapsed()));
                        res
                    })
                    .await;
                (key.object, fetched)
            });
        }
        let mut objects: BTreeMap<ObjectRequest, Arc<SecretObject>> = BTreeMap::new();
        let mut stale = Vec::new();
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let Ok((req, res)) = joined else { continue };
            match res {
                Ok(f) => {
                    if let Some(e) = f.stale {
                        stale.push((req.name.clone(), e));
                    }
                    objects.insert(req, f.object);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        let files = self.content.render(&objects)?;
        Ok(Rendered { files, stale })
    }

    /// One refresh cycle: render and apply. Returns the names of files that changed.
    pub async fn refresh(&mut self, volume: &dyn Volume) -> Result<Vec<String>, RefreshError> {
        let rendered = match self.render().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(volume = %self.volume_id, error = %e, "refresh failed; still serving the last good content");
                self.audit.record(
                    Event::new(EventKind::Error)
                        .volume(self.volume_id.clone())
                        .outcome(Outcome::Stale)
                        .error(&e),
                );
                return Err(e);
            }
        };
        for (object, e) in &rendered.stale {
            tracing::warn!(volume = %self.volume_id, object = %object, error = %e, "serving the last good value");
            self.audit.record(
                self.event(EventKind::Error)
                    .object(object.clone())
                    .outcome(Outcome::Stale)
                    .error(e),
            );
        }
        if rendered.stale.is_empty() {
            self.status.ok_now();
        } else {
            self.status
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let changed = match volume.apply(&rendered.files) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(volume = %self.volume_id, error = %e, "cannot update the volume");
                self.audit.record(
                    Event::new(EventKind::Error)
                        .volume(self.volume_id.clone())
                        .error(&e),
                );
                return Ok(Vec::new());
            }
        };
        let first = self.applied.is_empty();
        let mut now_applied = BTreeMap::new();
        for f in &rendered.files {
            now_applied.insert(f.name.as_str().to_owned(), f.version.clone());
        }
        if !first {
            for name in &changed {
                let mut ev = Event::new(EventKind::Rotate)
                    .volume(self.volume_id.clone())
                    .file(name.clone());
                ev.previous_version = self.applied.get(name).cloned();
                if let Some(f) = rendered.files.iter().find(|f| f.name.as_str() == name) {
                    ev = ev.object(f.object.clone()).version(f.version.clone());
                }
                self.audit.record(ev);
            }
            if !changed.is_empty() {
                self.status
                    .rotations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(volume = %self.volume_id, files = ?changed, "rotated");
            }
        }
        self.applied = now_applied;
        Ok(changed)
    }

    /// Refreshes `volume` until `shutdown`: when a cached value is due, when its backoff ends,
    /// or when the provider reports a change.
    pub async fn run(mut self, volume: &dyn Volume, shutdown: CancellationToken, poll: Duration) {
        let mut changes: Option<watch::Receiver<u64>> = self.provider.changes();
        let keys = self.keys();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = self
                .cache
                .next_due(&keys)
                .unwrap_or_else(|| tokio::time::Instant::now() + poll)
                .max(tokio::time::Instant::now() + MIN_CYCLE);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    volume.tick();
                    continue;
                }
                _ = tokio::time::sleep_until(due) => {}
                changed = async {
                    match changes.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        changes = None;
                        continue;
                    }
                    // Editors write in several steps: let the burst settle before reading.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(rx) = changes.as_mut() {
                        rx.mark_unchanged();
                    }
                    self.cache.expire_provider(self.provider.kind());
                }
            }
            let _ = self.refresh(volume).await;
        }
    }
}
