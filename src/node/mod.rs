//! Node mode: keybroker as the CSI node plugin of a Kubernetes node.
//!
//! A NodePublishVolume goes: parse ([`request`]) → attest (the service-account tokens must be
//! this pod's, [`token`]) → authorize ([`bindings`], default deny) → fetch through the node's
//! shared cache (one fetch per identity+object however many pods ask) → mount FUSE or tmpfs →
//! record non-secret state for restarts → keep fresh → audit. NodeUnpublishVolume unmounts,
//! removes the target, drops the content (zeroized) and evicts values no volume uses.
//!
//! Republish (kubelet repeats the call about every minute) re-checks the binding and the mount's
//! health and is otherwise free: a transient provider error never breaks a healthy mount.

pub mod bindings;
pub mod handover;
mod keeper_sync;
mod lifecycle;
pub mod metrics;
pub mod pod;
pub mod provider_api;
mod providers;
mod publish;
mod records;
mod recover;
pub mod request;
pub mod token;
mod unpublish;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use keybroker_csi::{NodeError, NodePlugin, PublishRequest, UnpublishRequest};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event, EventKind, Outcome};
use crate::cache::{CacheKey, FetchCache};
use crate::provider::azure::{self, AzureProvider};
use crate::provider::local::LocalProvider;
use crate::provider::vault::{self, VaultProvider};
use crate::provider::{Provider, ProviderError};
use crate::refresh::{RefreshError, RefreshStatus, Refresher};
use crate::volume::content::Limits;
use crate::volume::fanotify::{self, Audited, OpenAudit};
use crate::volume::fuse::FuseOptions;
use crate::volume::fuse_mux::MuxVolume;
use crate::volume::memfs::MemFs;
use crate::volume::tmpfs::TmpfsVolume;
use crate::volume::{Owner, Volume, VolumeKind, mountpoint};
use bindings::{Bindings, Grant, Identity};
use metrics::Metrics;
use request::{PodInfo, VolumeRequest};

use keeper_sync::Session;
use providers::{identity_key, provider_error};
use publish::PARSE_SLOTS;
use records::{
    FuseRecord, VolumeRecord, copy_path, detach_all, read_record, record_key, record_path,
    remove_record, target_alive, write_record,
};
use recover::Adopt;

/// How the node plugin is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    /// Non-secret per-volume records, so a restarted keybroker finds its volumes (memory-backed
    /// /run in the DaemonSet).
    pub state_dir: PathBuf,
    pub bindings_path: PathBuf,
    pub default_kind: VolumeKind,
    pub poll: Duration,
    pub limits: Limits,
    /// How long an unpublished FUSE volume that another mount namespace still holds is served.
    pub fuse_linger: Duration,
    /// Where managed identities' tokens come from (IMDS, or the App Service endpoint).
    pub azure_managed: crate::provider::azure::ManagedEndpoint,
    /// Audit opens of tmpfs volumes with fanotify, in this mode (node mode; needs
    /// CAP_SYS_ADMIN); with `--audit-fail-closed` the permission mode whatever is asked.
    pub audit_opens: Option<fanotify::Mode>,
    /// Gives freed heap back to the kernel (glibc `malloc_trim`); run once unpublishes have
    /// been quiet for a second.
    pub release_memory: Option<fn()>,
    /// Where duplicates of the FUSE session descriptors are kept across restarts. `None`: FUSE
    /// volumes end with the process (their containers see ENOTCONN).
    pub keeper: Option<crate::keeper::KeeperClient>,
    /// Provider mode: a Secrets Store volume no `Mount` has asked for in this long is
    /// forgotten (its values, pod token and login dropped from memory; the driver has no
    /// unmount call to say a pod is gone). `None` in node mode, where unpublish says it.
    pub forget_idle_after: Option<Duration>,
}

/// What [`NodeService::release_unused`] does with what no volume uses any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// The volumes are gone (unpublished): leases are revoked, idle Vault logins logged out.
    Revoke,
    /// Only forgotten (provider mode: the pod may still use what the driver wrote): dropped
    /// from memory, leases and tokens left to expire.
    Forget,
}

/// What provider mode remembers of a Secrets Store volume between the driver's `Mount` calls
/// (its first and every rotation poll), so that what no volume uses any more can go.
struct ProviderMount {
    identity: String,
    provider: Arc<dyn Provider>,
    keys: Vec<CacheKey>,
    last: Instant,
}

struct Published {
    volume_id: String,
    digest: String,
    pod: PodInfo,
    binding: String,
    /// The pod identity the volume acts as ([`identity_key`]).
    identity: String,
    provider: Arc<dyn Provider>,
    keys: Vec<CacheKey>,
    status: Arc<RefreshStatus>,
    cancel: CancellationToken,
    /// Runs the refresher; hands the volume back when cancelled.
    task: JoinHandle<Box<dyn Volume>>,
    /// Serves the broker API in the volume (`api: "true"`); ends with `cancel`.
    api: Option<JoinHandle<()>>,
}

pub struct NodeService {
    cfg: NodeConfig,
    bindings: ArcSwap<Bindings>,
    cache: Arc<FetchCache>,
    audit: AuditLog,
    pub metrics: Arc<Metrics>,
    locals: Mutex<HashMap<PathBuf, Arc<LocalProvider>>>,
    /// One Vault login per pod identity, shared by its volumes; revoked with its last volume.
    vaults: Mutex<HashMap<String, Arc<VaultProvider>>>,
    /// One Azure provider (token source and Key Vault clients) per pod identity.
    azures: Mutex<HashMap<String, Arc<AzureProvider>>>,
    /// Managed identities' token sources, shared node-wide (one token per identity and
    /// resource, whatever the number of pods the bindings let use it).
    managed_tokens: Mutex<HashMap<String, Arc<azure::TokenSource>>>,
    /// Publishes in progress: target → identity key.
    publishing: Mutex<HashMap<PathBuf, String>>,
    volumes: Mutex<HashMap<PathBuf, Published>>,
    /// Provider mode: the Secrets Store volumes by target, with their last `Mount`.
    provider_mounts: Mutex<HashMap<PathBuf, ProviderMount>>,
    target_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Attribute parses in flight (on the blocking pool).
    parse_slots: tokio::sync::Semaphore,
    ready: AtomicBool,
    /// Its socket (CSI, or the provider API) is bound and accepting: until then kubelet or
    /// the driver could not reach it, so it is not ready.
    serving: AtomicBool,
    serving_now: tokio::sync::Notify,
    /// kubelet's last word on the plugin registration (`None` until kubelet calls, and without
    /// `--kubelet-registration-dir`): `Err` holds its reason for refusing.
    kubelet: Mutex<Option<Result<(), String>>>,
    /// Audits every open of every tmpfs volume (fanotify), when `cfg.audit_opens`.
    opens: Option<Arc<OpenAudit>>,
    /// Unpublishes so far, to run `cfg.release_memory` once they have been quiet for a second.
    unpublished: Arc<AtomicU64>,
    /// FUSE sessions by target (their descriptors go to the keeper and to a handover).
    sessions: Mutex<HashMap<PathBuf, Session>>,
    /// Listening sockets the fd keeper keeps for the next process, by keeper name
    /// (`listen:csi`, `listen:registration`): given to a restarted keeper like the sessions.
    listeners: Mutex<Vec<(String, std::os::fd::OwnedFd)>>,
    /// FUSE sessions a previous process served whose record is damaged: kept (here and at
    /// the keeper) until kubelet republishes their target (served again) or unpublishes it.
    /// By record key.
    unclaimed: Mutex<HashMap<String, std::os::fd::OwnedFd>>,
    /// What the fd keeper holds, as far as this process knows.
    keeper_state: Mutex<keeper_sync::KeeperState>,
    /// CSI calls hold it shared; a handover takes it exclusively, so no publish or unpublish
    /// runs (or starts) while the volumes change hands.
    calls: tokio::sync::RwLock<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeService {
    /// A duplicate of the open auditor's fanotify group (permission modes), for the fd keeper.
    pub fn open_group_fd(&self) -> Option<std::os::fd::OwnedFd> {
        self.opens.as_ref().and_then(|o| o.group_fd())
    }

    /// `kept_group`: the fanotify group the fd keeper held or the previous process handed over
    /// (its opens wait for this process), and whether that process died (it may have left
    /// opens unanswered); call [`Self::recover`] next, which answers the waiting ones.
    pub fn new(
        cfg: NodeConfig,
        audit: AuditLog,
        kept_group: Option<(std::os::fd::OwnedFd, bool)>,
    ) -> anyhow::Result<Arc<Self>> {
        let bindings = Bindings::load(&cfg.bindings_path)?;
        std::fs::create_dir_all(cfg.state_dir.join("volumes")).map_err(|e| {
            bindings::BindingsError {
                path: cfg.state_dir.clone(),
                error: format!("cannot create the state directory: {e}"),
            }
        })?;
        let opens = if let Some(asked) = cfg.audit_opens {
            let mode = if audit.fail_closed() {
                fanotify::Mode::Permission
            } else {
                asked
            };
            // Opens a dead process was deciding are answered by their volume's policy once
            // the volumes are back (its journal in the state directory names each opener);
            // one it had not journaled yet is refused where a binding refuses readers, else
            // allowed (what the kernel did when the group died with the process).
            let orphans = kept_group
                .as_ref()
                .and_then(|(_, died)| died.then(|| bindings.enforces_readers()));
            let o = OpenAudit::start_in(
                audit.clone(),
                mode,
                kept_group.map(|(fd, _)| fd),
                orphans,
                Some(&cfg.state_dir),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start auditing tmpfs volumes with fanotify: {e} (the node needs CAP_SYS_ADMIN, as for mounting)"
                )
            })?;
            tracing::info!(mode = ?mode, pidfd = o.reports_pidfd(), kept = o.inherited(), "auditing opens of tmpfs volumes (fanotify)");
            Some(o)
        } else {
            None
        };
        Ok(Arc::new(Self {
            opens,
            unpublished: Arc::new(AtomicU64::new(0)),
            sessions: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            unclaimed: Mutex::new(HashMap::new()),
            keeper_state: Mutex::new(Default::default()),
            calls: tokio::sync::RwLock::new(()),
            cache: Arc::new(FetchCache::new(cfg.poll)),
            bindings: ArcSwap::from_pointee(bindings),
            audit,
            metrics: Arc::new(Metrics::default()),
            locals: Mutex::new(HashMap::new()),
            vaults: Mutex::new(HashMap::new()),
            azures: Mutex::new(HashMap::new()),
            managed_tokens: Mutex::new(HashMap::new()),
            publishing: Mutex::new(HashMap::new()),
            volumes: Mutex::new(HashMap::new()),
            provider_mounts: Mutex::new(HashMap::new()),
            target_locks: Mutex::new(HashMap::new()),
            parse_slots: tokio::sync::Semaphore::new(PARSE_SLOTS),
            ready: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            serving_now: tokio::sync::Notify::new(),
            kubelet: Mutex::new(None),
            cfg,
        }))
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn cache(&self) -> &FetchCache {
        &self.cache
    }

    /// Why `/readyz` says not ready, or `None` when ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("recovering the volumes of a previous process".into());
        }
        if !self.serving.load(Ordering::Relaxed) {
            return Some("the socket is not accepting calls yet".into());
        }
        if !self.audit.healthy() {
            return Some(format!(
                "the audit log cannot be written: {}",
                self.audit.last_error()
            ));
        }
        if let Some(Err(e)) = &*lock(&self.kubelet) {
            return Some(format!("kubelet refused the plugin registration: {e}"));
        }
        self.keeper_not_ready()
    }

    /// Whether kubelet has said it registered the plugin.
    pub fn kubelet_registered(&self) -> bool {
        matches!(*lock(&self.kubelet), Some(Ok(())))
    }

    /// Returns once the socket accepts calls.
    pub async fn wait_serving(&self) {
        loop {
            let notified = self.serving_now.notified();
            if self.serving.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }

    pub fn volume_count(&self) -> usize {
        lock(&self.volumes).len()
    }

    /// Rotations applied to volumes, over the daemon's life.
    pub fn rotations(&self) -> u64 {
        let live: u64 = lock(&self.volumes)
            .values()
            .map(|p| p.status.rotations.load(Ordering::Relaxed))
            .sum();
        live + self.metrics.rotations_retired.load(Ordering::Relaxed)
    }

    /// Seconds since the least recently refreshed volume last refreshed cleanly.
    pub fn max_staleness(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        lock(&self.volumes)
            .values()
            .map(|p| now.saturating_sub(p.status.last_ok.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0)
    }

    /// Reloads the bindings file; a bad file keeps the previous bindings (logged and audited).
    pub fn reload_bindings(&self) -> bool {
        match Bindings::load(&self.cfg.bindings_path) {
            Ok(b) => {
                let n = b.list.len();
                if **self.bindings.load() != b {
                    self.bindings.store(Arc::new(b));
                    self.sync_open_group();
                    tracing::info!(bindings = n, "bindings reloaded");
                    self.audit.record(
                        Event::new(EventKind::Mount)
                            .outcome(Outcome::Success)
                            .detail(format!("bindings reloaded: {n} bindings")),
                    );
                }
                true
            }
            Err(e) => {
                self.metrics
                    .bindings_reload_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "bindings reload failed; keeping the previous bindings");
                self.audit.record(
                    Event::new(EventKind::Error)
                        .error(&e)
                        .detail("bindings reload failed; previous bindings kept"),
                );
                false
            }
        }
    }

    /// Watches the bindings file's directory (ConfigMaps swap a `..data` link) and reloads on
    /// change, until `shutdown`.
    pub fn watch_bindings(self: &Arc<Self>, shutdown: CancellationToken) -> Result<(), String> {
        use notify::{RecursiveMode, Watcher};
        let dir = self
            .cfg
            .bindings_path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| !matches!(ev.kind, notify::EventKind::Access(_))) {
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| e.to_string())?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| e.to_string())?;
        let this = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = rx.recv() => if got.is_none() { return },
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                this.reload_bindings();
            }
        });
        Ok(())
    }

    fn target_lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.target_locks)
            .entry(target.to_owned())
            .or_default()
            .clone()
    }
}

impl NodePlugin for NodeService {
    fn node_id(&self) -> String {
        self.cfg.node_id.clone()
    }

    /// Ready once recovered and its socket accepts calls, and only while the audit log can be
    /// written (a node that cannot
    /// account for what it serves should not take new pods).
    fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    fn serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
        self.serving_now.notify_waiters();
    }

    async fn publish(&self, req: PublishRequest) -> Result<(), NodeError> {
        let _call = self.calls.read().await;
        let started = Instant::now();
        let res = self.do_publish(req).await;
        self.metrics.observe_publish(started.elapsed(), res.is_ok());
        res
    }

    async fn unpublish(&self, req: UnpublishRequest) -> Result<(), NodeError> {
        let _call = self.calls.read().await;
        self.do_unpublish(req).await
    }
}

impl keybroker_csi::registration::RegistrationStatus for NodeService {
    fn registration(&self, registered: bool, error: &str) {
        if registered {
            tracing::info!(
                driver = keybroker_csi::DRIVER_NAME,
                "kubelet registered the plugin"
            );
            *lock(&self.kubelet) = Some(Ok(()));
        } else {
            tracing::error!(
                driver = keybroker_csi::DRIVER_NAME,
                error,
                "kubelet refused the plugin registration: no pod on this node can mount keybroker volumes until it is fixed"
            );
            *lock(&self.kubelet) = Some(Err(error.to_owned()));
        }
    }
}
