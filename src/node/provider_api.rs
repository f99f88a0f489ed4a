//! `keybroker provider`: the Secrets Store CSI driver's provider API behind the same request
//! parsing, bindings, providers, node-wide cache and audit as a node volume. The driver writes
//! the files; keybroker answers each `Mount` (the first one and every rotation poll) from its
//! cache, so a poll costs a provider request only for values that are due.
//!
//! The pod info in the attributes is the driver's attestation (it comes from kubelet through
//! the driver); everything else there is the pod author's, and the driver lets a pod's volume
//! attributes overwrite the SecretProviderClass's parameters: so authorization rests on the
//! bindings alone, exactly as for node volumes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keybroker_csi::NodeError;
use keybroker_csi::provider::{MountRefused, MountRequest, Mounted, MountedFile, SecretsProvider};

use super::publish::Pending;
use super::{NodeService, ProviderMount, Release, identity_key, lock};
use crate::audit::{Event, EventKind};
use crate::provider::ProviderError;
use crate::refresh::{RefreshError, Refresher};

/// The short code the driver puts in the pod's events (the reason is in keybroker's log and
/// audit record, never in the code).
fn code(e: &NodeError) -> &'static str {
    match e {
        NodeError::InvalidArgument(_) => "InvalidParameters",
        NodeError::PermissionDenied(_) => "PermissionDenied",
        NodeError::FailedPrecondition(_) => "FailedPrecondition",
        NodeError::Unavailable(_) => "Unavailable",
        NodeError::ResourceExhausted(_) => "ResourceExhausted",
        NodeError::NotFound(_) => "NotFound",
        NodeError::AlreadyExists(_) | NodeError::Internal(_) => "Internal",
    }
}

impl SecretsProvider for NodeService {
    async fn mount(&self, req: MountRequest) -> Result<Mounted, MountRefused> {
        let refuse = |e: NodeError| MountRefused {
            code: code(&e).to_owned(),
        };
        let started = std::time::Instant::now();
        // The volume is named by its target, as the driver knows it.
        let vid = format!("secrets-store:{}", req.target_path.display());
        if !self.audit.may_serve() {
            return Err(refuse(self.fail(
                None,
                &vid,
                NodeError::Unavailable(format!(
                    "audit log cannot be written: {}",
                    self.audit.last_error()
                )),
            )));
        }
        let vr = self
            .parse_request_with_mode(req.attributes, req.secrets, req.permission)
            .await
            .map_err(|e| refuse(self.fail(None, &vid, NodeError::InvalidArgument(e.0))))?;
        let grant = self
            .bindings
            .load()
            .authorize(&vr)
            .map_err(|why| refuse(self.deny(Some(&vr.pod), &vid, why)))?;
        // In flight from here: a sweep keeps this target's pod token and identity.
        let _pending = Pending::new(
            &self.publishing,
            &req.target_path,
            identity_key(&grant, &vr.pod),
        );
        let provider = self
            .provider_for(&grant, &vr, &req.target_path)
            .map_err(|e| refuse(self.fail(Some(&vr.pod), &vid, e)))?;
        let identity = identity_key(&grant, &vr.pod);
        let refresher = Refresher::new(
            vid.clone(),
            vr.content.clone(),
            provider.clone(),
            identity.clone(),
            self.cache.clone(),
            self.audit.clone(),
        )
        .with_pod(vr.pod.audit_ref());
        // Remembered before the fetch: a value this Mount brings into the cache belongs to a
        // volume a sweep can see (and forget once no Mount asks for it).
        lock(&self.provider_mounts).insert(
            req.target_path.clone(),
            ProviderMount {
                identity,
                provider,
                keys: refresher.keys(),
                last: Instant::now(),
            },
        );
        let rendered = match refresher.render().await {
            Ok(r) => r,
            Err(RefreshError::Provider(p @ ProviderError::PermissionDenied { .. })) => {
                return Err(refuse(self.provider_denied(&vr.pod, &vid, &p)));
            }
            Err(e) => {
                let ne = match &e {
                    RefreshError::Provider(p) => super::provider_error(&vr.pod, p),
                    RefreshError::Content(c) => NodeError::FailedPrecondition(c.to_string()),
                };
                return Err(refuse(self.fail(Some(&vr.pod), &vid, ne)));
            }
        };
        let mut versions = Vec::new();
        let mut seen = BTreeSet::new();
        let mut files = Vec::with_capacity(rendered.files.len());
        for f in rendered.files {
            if seen.insert(f.object.clone()) {
                versions.push((f.object.clone(), f.version.clone()));
            }
            files.push(MountedFile {
                path: f.name.as_str().to_owned(),
                mode: f.mode,
                contents: zeroize::Zeroizing::new(f.bytes.expose().to_vec()),
            });
        }
        // Every object has a version entry, even one whose files were all skipped (a version
        // history shorter than asked): the driver refuses a response without them.
        for o in vr.content.objects() {
            if seen.insert(o.name.clone()) {
                versions.push((o.name, String::new()));
            }
        }
        self.metrics.publishes.fetch_add(1, Ordering::Relaxed);
        self.metrics.observe_publish(started.elapsed(), true);
        self.audit.record(
            Event::new(EventKind::Mount)
                .volume(vid)
                .pod(vr.pod.audit_ref())
                .detail(format!(
                    "Secrets Store provider Mount, binding {}, {} files",
                    grant.binding,
                    files.len()
                )),
        );
        Ok(Mounted { versions, files })
    }

    fn serving(&self) {
        keybroker_csi::NodePlugin::serving(self);
    }

    fn refused(&self, target_path: &str, reason: &str) {
        let vid = format!("secrets-store:{target_path}");
        self.fail(
            None,
            &vid,
            NodeError::InvalidArgument(format!("the driver's Mount request: {reason}")),
        );
    }
}

impl NodeService {
    /// Forgets the Secrets Store volumes no `Mount` has asked for in `idle`, then drops what
    /// no remaining volume uses: cached values (zeroized), pod tokens, logins. Leases and
    /// Vault tokens are not revoked (a pod whose driver does not rotate still uses what it
    /// was given; they end at their TTL). How many volumes were forgotten.
    pub async fn forget_idle_provider_mounts(&self, idle: Duration) -> usize {
        let forgotten = {
            let mut mounts = lock(&self.provider_mounts);
            let before = mounts.len();
            mounts.retain(|_, m| m.last.elapsed() < idle);
            before - mounts.len()
        };
        if forgotten > 0 {
            self.release_unused(Release::Forget).await;
            tracing::info!(
                volumes = forgotten,
                idle = %humantime::format_duration(idle),
                cached = self.cache.len(),
                "forgot Secrets Store volumes no Mount asked for: their values, pod tokens and logins left memory where no other volume uses them"
            );
        }
        forgotten
    }

    /// Secrets Store volumes provider mode remembers (a Mount within the idle time).
    pub fn provider_mounts(&self) -> usize {
        lock(&self.provider_mounts).len()
    }
}

/// Forgets idle volumes every quarter of `idle` (at least every second, at most every
/// minute) until `shutdown`.
pub async fn sweep(
    node: Arc<NodeService>,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                node.forget_idle_provider_mounts(idle).await;
            }
        }
    }
}

/// Serves the provider API for `node` (its bindings, cache and audit) until `shutdown`.
pub async fn serve(
    node: Arc<NodeService>,
    endpoint: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    keybroker_csi::provider::serve(endpoint, node, shutdown).await
}
