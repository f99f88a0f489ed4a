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
pub mod metrics;
pub mod provider_api;
pub mod request;
pub mod token;

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
    /// Audit opens of tmpfs volumes with fanotify (node mode; needs CAP_SYS_ADMIN).
    pub audit_opens: bool,
    /// Gives freed heap back to the kernel (glibc `malloc_trim`); run once unpublishes have
    /// been quiet for a second.
    pub release_memory: Option<fn()>,
    /// Where duplicates of the FUSE session descriptors are kept across restarts. `None`: FUSE
    /// volumes end with the process (their containers see ENOTCONN).
    pub keeper: Option<crate::keeper::KeeperClient>,
}

/// What is recorded about a published volume: enough to take it over after a restart, and no
/// secret (no tokens, no values).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct VolumeRecord {
    volume_id: String,
    target: PathBuf,
    kind: VolumeKind,
    attributes: BTreeMap<String, String>,
    /// A FUSE volume's session, for the next process to serve it without a second INIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fuse: Option<FuseRecord>,
}

/// What a process that takes a FUSE session over must know (nothing secret): which kernel
/// connection it is, the protocol minor agreed at INIT, and the names behind its inodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FuseRecord {
    /// The connection number (device minor of the mount, /sys/fs/fuse/connections/N).
    conn: u32,
    minor: u32,
    inodes: crate::volume::memfs::InodeTable,
}

/// A FUSE session this process serves, as the keeper and a handover see it.
struct Session {
    /// The name the keeper holds it under (the record's file name).
    key: String,
    /// A duplicate of the session descriptor.
    fd: std::os::fd::OwnedFd,
    fs: Arc<MemFs>,
}

/// A volume a previous process left mounted, to serve on.
enum Adopt {
    Tmpfs(TmpfsVolume),
    Fuse {
        fd: std::os::fd::OwnedFd,
        rec: FuseRecord,
    },
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
    /// A newer process asked for this one's volumes: it gets the sessions at shutdown.
    handover: Mutex<Option<std::os::fd::OwnedFd>>,
}

/// What [`NodeService::recover_one`] says of a tmpfs volume it kept serving.
const TAKEN_OVER: &str = "tmpfs volume taken over after restart";
/// ... and of a FUSE session it serves on.
const FUSE_TAKEN_OVER: &str = "FUSE session taken over after restart";

/// Volume attribute parses that may run at once on the blocking pool.
const PARSE_SLOTS: usize = 2;
/// Attributes up to this size (keys and values together) are parsed on the calling worker:
/// with nesting bounded to 32 levels before any parser runs, the worst such input parses in
/// well under a millisecond (`cargo bench --bench hostile_publish`, "8 KiB" row).
const INLINE_PARSE_BYTES: usize = 8 * 1024;

/// Marks a publish in flight for [`NodeService::release_unused`]; unmarked when dropped.
struct Pending<'a> {
    map: &'a Mutex<HashMap<PathBuf, String>>,
    target: PathBuf,
}

impl<'a> Pending<'a> {
    fn new(map: &'a Mutex<HashMap<PathBuf, String>>, target: &Path, identity: String) -> Self {
        lock(map).insert(target.to_owned(), identity);
        Self {
            map,
            target: target.to_owned(),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(self.map).remove(&self.target);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The name of a target's record (and of its session at the keeper).
/// A volume's name in the state directory: its record's file name and its staging directory's.
fn record_key(target: &Path) -> String {
    mountpoint::staging_name(target)
}

fn record_path(state_dir: &Path, target: &Path) -> PathBuf {
    state_dir
        .join("volumes")
        .join(format!("{}.json", record_key(target)))
}

/// Whether a FUSE server answers at `target` (a killed one leaves ENOTCONN behind).
fn target_alive(target: &Path) -> bool {
    !matches!(std::fs::metadata(target), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
        && mountpoint::mount_at(target).is_some_and(|m| mountpoint::is_keybroker_mount(&m))
}

/// Detaches every keybroker mount at `target` and at its tmpfs staging directory (under
/// `staging_root`), however many are stacked. Returns how many there were.
fn detach_all(staging_root: &Path, target: &Path) -> usize {
    let staging = mountpoint::staging_dir(staging_root, target);
    let n =
        mountpoint::detach_keybroker_mounts(target) + mountpoint::detach_keybroker_mounts(&staging);
    let _ = std::fs::remove_dir(&staging);
    n
}

/// Writes a volume's record atomically (write + rename), so a crash never leaves half a record.
fn write_record(path: &Path, record: &VolumeRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The volume's service-account token for `audience` (kubelet's, for this publish or
/// republish). `None` when kubelet sent no tokens at all (a volume taken over after a restart);
/// an error naming the audience when it sent others but not this one.
fn pod_jwt(
    grant: &Grant,
    vr: &VolumeRequest,
    audience: &str,
    used_for: &str,
) -> Result<Option<crate::provider::PodJwt>, NodeError> {
    match vr.tokens.iter().find(|t| t.audience == audience) {
        Some(t) => Ok(Some(crate::provider::PodJwt {
            pod: vr.pod.to_string(),
            jwt: t.token.clone(),
            expires: t.expires,
        })),
        None if vr.tokens.is_empty() => Ok(None),
        None => Err(NodeError::FailedPrecondition(format!(
            "{}: kubelet sent no service-account token for audience {audience:?}, which binding {:?} {used_for}: add it to the CSIDriver's tokenRequests",
            vr.pod, grant.binding
        ))),
    }
}

fn provider_error(pod: &PodInfo, e: &ProviderError) -> NodeError {
    let msg = format!("{pod}: {e}");
    match e {
        ProviderError::Throttled { .. } | ProviderError::Unavailable { .. } => {
            NodeError::Unavailable(msg)
        }
        ProviderError::PermissionDenied { .. } => NodeError::PermissionDenied(msg),
        ProviderError::NotFound { .. } | ProviderError::Invalid { .. } => {
            NodeError::FailedPrecondition(msg)
        }
    }
}

/// The identity a volume acts as, as caches and logins see it. Vault and Azure federation log
/// in *as the pod's service account*, and the provider may grant two service accounts different
/// things under one binding identity, so their values and tokens are never shared.
fn identity_key(grant: &Grant, pod: &PodInfo) -> String {
    match &grant.identity {
        Identity::Local(_) => grant.identity.key(),
        Identity::Vault(_) | Identity::Azure(_) => format!(
            "{} as {}/{}",
            grant.identity.key(),
            pod.namespace,
            pod.service_account
        ),
    }
}

impl NodeService {
    pub fn new(cfg: NodeConfig, audit: AuditLog) -> anyhow::Result<Arc<Self>> {
        let bindings = Bindings::load(&cfg.bindings_path)?;
        std::fs::create_dir_all(cfg.state_dir.join("volumes")).map_err(|e| {
            bindings::BindingsError {
                path: cfg.state_dir.clone(),
                error: format!("cannot create the state directory: {e}"),
            }
        })?;
        let opens = if cfg.audit_opens {
            let mode = if audit.fail_closed() {
                fanotify::Mode::Permission
            } else {
                fanotify::Mode::Notify
            };
            let o = OpenAudit::start(audit.clone(), mode).map_err(|e| {
                anyhow::anyhow!(
                    "cannot start auditing tmpfs volumes with fanotify: {e} (the node needs CAP_SYS_ADMIN, as for mounting)"
                )
            })?;
            tracing::info!(mode = ?mode, pidfd = o.reports_pidfd(), "auditing opens of tmpfs volumes (fanotify)");
            Some(o)
        } else {
            None
        };
        Ok(Arc::new(Self {
            opens,
            unpublished: Arc::new(AtomicU64::new(0)),
            sessions: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            handover: Mutex::new(None),
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
        None
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

    /// The provider a volume uses. For Vault this is the pod identity's shared login, given the
    /// volume's service-account token (`tokens`: kubelet's, for this publish or republish).
    fn provider_for(
        &self,
        grant: &Grant,
        vr: &VolumeRequest,
        target: &Path,
    ) -> Result<Arc<dyn Provider>, NodeError> {
        match &grant.identity {
            Identity::Vault(v) => {
                let audience = v.audience();
                let key = identity_key(grant, &vr.pod);
                let mut vaults = lock(&self.vaults);
                let p = match vaults.get(&key) {
                    Some(p) => p.clone(),
                    None => {
                        let ca_pem = match &v.ca_file {
                            None => None,
                            Some(f) => Some(std::fs::read(f).map_err(|e| {
                                NodeError::FailedPrecondition(format!(
                                    "binding {:?}: cannot read the Vault CA file {}: {e}",
                                    grant.binding,
                                    f.display()
                                ))
                            })?),
                        };
                        let endpoint = vault::Endpoint {
                            address: v.address.clone(),
                            namespace: v.namespace.clone(),
                            ca_pem,
                            tls_server_name: v.tls_server_name.clone(),
                            timeout: Duration::from_secs(15),
                        };
                        let login = vault::LoginConfig {
                            auth_mount: v.auth_mount.clone(),
                            role: v.role.clone(),
                            identity: key.clone(),
                        };
                        let p = VaultProvider::new(&endpoint, login).map_err(|e| {
                            NodeError::FailedPrecondition(format!(
                                "binding {:?}: {e}",
                                grant.binding
                            ))
                        })?;
                        vaults.insert(key.clone(), p.clone());
                        p
                    }
                };
                if let Some(jwt) = pod_jwt(grant, vr, audience, "logs in to Vault with")? {
                    p.set_jwt(&target.to_string_lossy(), jwt);
                }
                Ok(p)
            }
            Identity::Local(l) => {
                let mut locals = lock(&self.locals);
                if let Some(p) = locals.get(&l.path) {
                    return Ok(p.clone());
                }
                let p = Arc::new(
                    LocalProvider::open(&l.path, self.cfg.limits.max_object_bytes).map_err(
                        |e| {
                            NodeError::FailedPrecondition(format!(
                                "binding {:?}: {e}",
                                grant.binding
                            ))
                        },
                    )?,
                );
                locals.insert(l.path.clone(), p.clone());
                Ok(p)
            }
            Identity::Azure(a) => self.azure_provider(grant, a, vr, target),
        }
    }

    /// The Azure provider of a pod identity, given the volume's service-account token for
    /// workload identity federation (publish and every republish).
    fn azure_provider(
        &self,
        grant: &Grant,
        a: &bindings::AzureIdentity,
        vr: &VolumeRequest,
        target: &Path,
    ) -> Result<Arc<dyn Provider>, NodeError> {
        let key = identity_key(grant, &vr.pod);
        let refuse = |what: String| {
            NodeError::FailedPrecondition(format!("binding {:?}: {what}", grant.binding))
        };
        let p = {
            let mut azures = lock(&self.azures);
            match azures.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let ca = match &a.ca_file {
                        None => None,
                        Some(f) => Some(std::fs::read(f).map_err(|e| {
                            refuse(format!(
                                "cannot read the Azure CA file {}: {e}",
                                f.display()
                            ))
                        })?),
                    };
                    let http = crate::tls::azure_client(ca.as_deref()).map_err(refuse)?;
                    let tokens = match &a.managed_identity {
                        None => azure::TokenSource::new(
                            azure::Source::Federated {
                                authority: a.authority_host().to_owned(),
                                tenant: a.tenant_id.clone(),
                                client_id: a.client_id.clone(),
                                jwts: Mutex::new(Default::default()),
                            },
                            http.clone(),
                            key.clone(),
                        ),
                        Some(mi) => lock(&self.managed_tokens)
                            .entry(grant.identity.key())
                            .or_insert_with(|| {
                                azure::TokenSource::new(
                                    azure::Source::Managed {
                                        client_id: mi.client_id.clone(),
                                        endpoint: self.cfg.azure_managed.clone(),
                                    },
                                    http.clone(),
                                    grant.identity.key(),
                                )
                            })
                            .clone(),
                    };
                    let suffix = a.keyvault_dns_suffix().to_owned();
                    let access = azure::VaultAccess {
                        verify_challenge_resource: bindings::AZURE_CLOUD_KEYVAULT_SUFFIXES
                            .contains(&suffix.as_str()),
                        dns_suffix: suffix,
                    };
                    let p = AzureProvider::new(tokens, http, access);
                    azures.insert(key.clone(), p.clone());
                    p
                }
            }
        };
        if a.managed_identity.is_none()
            && let Some(jwt) = pod_jwt(grant, vr, a.audience(), "exchanges at Entra ID")?
        {
            p.tokens().set_jwt(&target.to_string_lossy(), jwt);
        }
        Ok(p)
    }

    fn deny(&self, pod: Option<&PodInfo>, volume_id: &str, reason: String) -> NodeError {
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, reason = %reason, "publish denied");
        let mut ev = Event::new(EventKind::Deny)
            .volume(volume_id)
            .outcome(Outcome::Denied)
            .error(&reason);
        ev.pod = pod.map(PodInfo::audit_ref);
        self.audit.record(ev);
        NodeError::PermissionDenied(reason)
    }

    /// A provider refused the pod's identity or an object (Vault refused the login, a 403):
    /// that is a denial, audited and counted as one, with the provider's reason code.
    fn provider_denied(&self, pod: &PodInfo, volume_id: &str, e: &ProviderError) -> NodeError {
        let code = match e {
            ProviderError::PermissionDenied { code, .. } => code.clone(),
            _ => String::new(),
        };
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, reason = %code, error = %e, "publish denied by the provider");
        self.audit.record(
            Event::new(EventKind::Deny)
                .volume(volume_id)
                .pod(pod.audit_ref())
                .outcome(Outcome::Denied)
                .reason(code)
                .error(e),
        );
        NodeError::PermissionDenied(format!("{pod}: {e}"))
    }

    /// A previous process's mounts were found at a target with no record and cleaned.
    fn orphans_cleaned(&self, vid: &str, pod: &PodInfo, target: &Path, n: usize) {
        self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id = vid, target = %target.display(), mounts = n, "cleaned keybroker mounts an earlier process left at the target without a record (a crash during a publish)");
        self.audit.record(
            Event::new(EventKind::Unmount)
                .volume(vid)
                .pod(pod.audit_ref())
                .detail(format!(
                    "{n} keybroker mounts left at the target by an interrupted publish were cleaned"
                )),
        );
    }

    /// Where this node mounts its tmpfs volumes read-write (each target is a read-only bind of
    /// one): under its own state directory, so another node process's (a test beside it, the
    /// other side of a handover with another state directory) are never taken for its own.
    fn staging_root(&self) -> PathBuf {
        self.cfg.state_dir.join("staging")
    }

    fn fail(&self, pod: Option<&PodInfo>, volume_id: &str, e: NodeError) -> NodeError {
        self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, error = %e, "publish failed");
        let mut ev = Event::new(EventKind::Error).volume(volume_id).error(&e);
        ev.pod = pod.map(PodInfo::audit_ref);
        self.audit.record(ev);
        e
    }

    /// Parses a publish request's attributes. Anything over [`INLINE_PARSE_BYTES`] goes to
    /// the blocking pool, at most [`PARSE_SLOTS`] at a time: a pod's large YAML never runs on
    /// the runtime workers that serve every other pod's calls (parsing is bounded in depth and
    /// size too, see [`crate::untrusted`]).
    async fn parse_request(
        &self,
        ctx: BTreeMap<String, String>,
        secrets: keybroker_csi::Secrets,
    ) -> Result<VolumeRequest, request::RequestError> {
        self.parse_request_with_mode(ctx, secrets, request::NODE_DEFAULT_MODE)
            .await
    }

    async fn parse_request_with_mode(
        &self,
        ctx: BTreeMap<String, String>,
        secrets: keybroker_csi::Secrets,
        mode: u32,
    ) -> Result<VolumeRequest, request::RequestError> {
        let (kind, limits) = (self.cfg.default_kind, self.cfg.limits);
        let size: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
        // YAML anchors and aliases can make a small text expand a lot (the parser caps the
        // expansion, still at tens of milliseconds): text that has the characters goes to the
        // pool whatever its size.
        let may_alias = ctx.values().any(|v| v.contains(['&', '*']));
        if size <= INLINE_PARSE_BYTES && !may_alias {
            // Small attributes (every ordinary volume) parse in microseconds; a hand-off to the
            // blocking pool would cost more than the parse.
            return request::parse_with_mode(&ctx, &secrets, kind, limits, mode);
        }
        let _slot = self.parse_slots.acquire().await;
        tokio::task::spawn_blocking(move || {
            request::parse_with_mode(&ctx, &secrets, kind, limits, mode)
        })
        .await
        .unwrap_or_else(|_| {
            Err(request::RequestError(
                "the volume attributes could not be parsed".into(),
            ))
        })
    }

    async fn do_publish(&self, req: PublishRequest) -> Result<(), NodeError> {
        let started = Instant::now();
        let vid = req.volume_id.clone();
        if !self.audit.may_serve() {
            return Err(self.fail(
                None,
                &vid,
                NodeError::Unavailable(format!(
                    "audit log cannot be written: {}; keybroker runs with --audit-fail-closed and publishes nothing until it can (kubelet retries)",
                    self.audit.last_error()
                )),
            ));
        }
        let vr = self
            .parse_request(req.volume_context, req.secrets)
            .await
            .map_err(|e| self.fail(None, &vid, NodeError::InvalidArgument(e.0)))?;
        for t in &vr.tokens {
            token::check(t, &vr.pod, SystemTime::now())
                .map_err(|why| self.deny(Some(&vr.pod), &vid, format!("{}: {why}", vr.pod)))?;
        }
        let target = req.target_path.clone();
        let tlock = self.target_lock(&target);
        let _held = tlock.lock().await;

        // Republish: same volume at the same target.
        let existing = lock(&self.volumes)
            .get(&target)
            .map(|p| (p.volume_id.clone(), p.digest.clone()));
        if let Some((old_id, old_digest)) = existing {
            if old_id != vid {
                return Err(self.fail(
                    Some(&vr.pod),
                    &vid,
                    NodeError::AlreadyExists(format!(
                        "{} already has volume {old_id:?} published",
                        target.display()
                    )),
                ));
            }
            if old_digest != vr.digest {
                return Err(self.fail(
                    Some(&vr.pod),
                    &vid,
                    NodeError::AlreadyExists(format!(
                        "volume {vid:?} is already published at {} with different attributes",
                        target.display()
                    )),
                ));
            }
            let grant = match self.bindings.load().authorize(&vr) {
                Ok(g) => g,
                Err(why) => return Err(self.deny(Some(&vr.pod), &vid, why)),
            };
            // kubelet's fresh tokens keep the identity's login possible.
            if matches!(grant.identity, Identity::Vault(_) | Identity::Azure(_)) {
                self.provider_for(&grant, &vr, &target)
                    .map_err(|e| self.fail(Some(&vr.pod), &vid, e))?;
            }
            if target_alive(&target) {
                self.metrics.republishes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The mount died under us: replace it, and say what that means for the pod.
            let msg = "the volume's mount was dead (its FUSE server is gone); remounted. Containers that \
                       already had it mounted keep a dead mount until the pod restarts";
            tracing::error!(volume_id = %vid, target = %target.display(), pod = %vr.pod, "{msg}");
            self.audit.record(
                Event::new(EventKind::Error)
                    .volume(vid.clone())
                    .pod(vr.pod.audit_ref())
                    .detail(msg)
                    .outcome(Outcome::Failure),
            );
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = lock(&self.volumes).remove(&target) {
                p.cancel.cancel();
            }
            detach_all(&self.staging_root(), &target);
        }

        let grant = self
            .bindings
            .load()
            .authorize(&vr)
            .map_err(|why| self.deny(Some(&vr.pod), &vid, why))?;
        // Until the volume is in `volumes`, an unpublish elsewhere must not log its identity
        // out, revoke what it fetched, or drop its service-account token.
        let pending = Pending::new(&self.publishing, &target, identity_key(&grant, &vr.pod));
        let provider = self
            .provider_for(&grant, &vr, &target)
            .map_err(|e| self.fail(Some(&vr.pod), &vid, e))?;
        let res = self
            .mount_new(&vid, &target, vr, grant, provider, started, None)
            .await;
        drop(pending);
        if res.is_err() {
            // Nothing was published: forget the volume's token, drop what it fetched.
            self.release_unused().await;
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn mount_new(
        &self,
        vid: &str,
        target: &Path,
        vr: VolumeRequest,
        grant: Grant,
        provider: Arc<dyn Provider>,
        started: Instant,
        adopt: Option<Adopt>,
    ) -> Result<(), NodeError> {
        let pod = vr.pod.clone();
        let identity = identity_key(&grant, &pod);
        let mut refresher = Refresher::new(
            vid.to_owned(),
            vr.content.clone(),
            provider.clone(),
            identity.clone(),
            self.cache.clone(),
            self.audit.clone(),
        )
        .with_pod(pod.audit_ref());
        if vr.own_values {
            refresher = refresher.with_own_values();
        }
        let mut created = false;
        if adopt.is_none() {
            // Whatever a crashed process left here is cleaned first; the target must then
            // be an empty directory of its own (not a symlink).
            let prepared =
                mountpoint::prepare_target(target, &self.staging_root()).map_err(|e| {
                    self.fail(Some(&pod), vid, NodeError::InvalidArgument(e.to_string()))
                })?;
            created = prepared.created;
            if prepared.orphans_cleaned > 0 {
                self.orphans_cleaned(vid, &pod, target, prepared.orphans_cleaned);
            }
        }
        let undo_target = |created: bool| {
            if created {
                let _ = std::fs::remove_dir(target);
            }
        };
        let rendered = match refresher.render().await {
            Ok(r) => r,
            Err(RefreshError::Provider(p @ ProviderError::PermissionDenied { .. })) => {
                undo_target(created);
                return Err(self.provider_denied(&pod, vid, &p));
            }
            Err(e) => {
                undo_target(created);
                let ne = match &e {
                    RefreshError::Provider(p) => provider_error(&pod, p),
                    RefreshError::Content(c) => NodeError::FailedPrecondition(c.to_string()),
                };
                return Err(self.fail(Some(&pod), vid, ne));
            }
        };
        // The record goes down before the mount exists: after a crash at any later point the
        // next process finds the record and repairs, adopts or cleans the target.
        let record = VolumeRecord {
            volume_id: vid.to_owned(),
            target: target.to_owned(),
            kind: vr.kind,
            attributes: vr.attributes.clone(),
            fuse: match &adopt {
                Some(Adopt::Fuse { rec, .. }) => Some(rec.clone()),
                _ => None,
            },
        };
        let path = record_path(&self.cfg.state_dir, target);
        if let Err(e) = write_record(&path, &record) {
            undo_target(created);
            return Err(self.fail(
                Some(&pod),
                vid,
                NodeError::Internal(format!(
                    "cannot record the volume in {}: {e}",
                    path.display()
                )),
            ));
        }
        let forget = |created: bool| {
            let _ = std::fs::remove_file(&path);
            undo_target(created);
        };
        let owner = Owner { uid: 0, gid: 0 };
        let mut session = None;
        let volume: Box<dyn Volume> = match (adopt, vr.kind) {
            (Some(Adopt::Tmpfs(t)), _) => Box::new(t),
            (adopt @ (None | Some(Adopt::Fuse { .. })), VolumeKind::Fuse) => {
                let opts = FuseOptions {
                    threads: 1,
                    allow_other: true,
                    kernel_cache: true,
                    linger: self.cfg.fuse_linger,
                };
                let audit = Some(self.audit.clone());
                // Every change of the inode table is recorded before the kernel can see it.
                let record_table = |fs: &MemFs, conn: u32, minor: u32| {
                    let (base, path) = (record.clone(), path.clone());
                    fs.on_table(move |t| {
                        let mut r = base.clone();
                        r.fuse = Some(FuseRecord {
                            conn,
                            minor,
                            inodes: t.clone(),
                        });
                        if let Err(e) = write_record(&path, &r) {
                            tracing::warn!(record = %path.display(), error = %e, "cannot record the volume's inode table; a restart will remount it");
                        }
                    });
                };
                // Served by a task on the runtime: threads do not grow with volumes.
                let mounted = match adopt {
                    Some(Adopt::Fuse { fd, rec }) => {
                        let fs = Arc::new(MemFs::restore(vid, owner, audit, rec.inodes.clone()));
                        fs.apply(&rendered.files);
                        record_table(&fs, rec.conn, rec.minor);
                        MuxVolume::adopt(target, fd, fs, &opts, rec.minor)
                    }
                    _ => {
                        let fs = Arc::new(MemFs::new(vid, owner, audit));
                        fs.apply(&rendered.files);
                        MuxVolume::mount(target, fs, &opts).inspect(|v| {
                            record_table(v.fs(), v.connection(), v.minor());
                        })
                    }
                };
                let v = mounted.map_err(|e| {
                    forget(created);
                    self.fail(Some(&pod), vid, NodeError::Internal(e.to_string()))
                })?;
                session = match v.session_fd().try_clone_to_owned() {
                    Ok(fd) => Some(Session {
                        key: record_key(target),
                        fd,
                        fs: v.fs().clone(),
                    }),
                    Err(e) => {
                        tracing::warn!(volume_id = vid, error = %e, "cannot duplicate the FUSE session descriptor; the volume will not survive a restart");
                        None
                    }
                };
                Box::new(v)
            }
            (Some(Adopt::Fuse { .. }), VolumeKind::Tmpfs) => {
                return Err(self.fail(
                    Some(&pod),
                    vid,
                    NodeError::Internal("a FUSE session recorded for a tmpfs volume".into()),
                ));
            }
            (None, VolumeKind::Tmpfs) => {
                let v = TmpfsVolume::mount(
                    target,
                    &mountpoint::staging_dir(&self.staging_root(), target),
                    self.cfg.limits.max_volume_bytes * 3,
                    owner,
                )
                .map_err(|e| {
                    forget(created);
                    self.fail(Some(&pod), vid, NodeError::Internal(e.to_string()))
                })?;
                Box::new(v)
            }
        };
        // A mounted volume that cannot be completed is taken down again, and nothing is left.
        let abandon = |volume: Box<dyn Volume>, why: String| {
            let _ = volume.unmount();
            detach_all(&self.staging_root(), target);
            forget(created);
            self.fail(Some(&pod), vid, NodeError::Internal(why))
        };
        // Every open of a tmpfs volume is audited (fanotify mark on its tmpfs instance),
        // before the pod can see it.
        let volume: Box<dyn Volume> = match (&self.opens, volume.kind()) {
            (Some(o), VolumeKind::Tmpfs) => {
                let root = mountpoint::staging_dir(&self.staging_root(), target);
                if let Err(e) = o.watch(vid, &root) {
                    return Err(abandon(
                        volume,
                        format!("cannot audit the volume's opens (fanotify mark): {e}"),
                    ));
                }
                Box::new(Audited::new(volume, o.clone(), root))
            }
            _ => volume,
        };
        // `api: "true"`: what the volume holds is also what its broker API serves.
        let broker = vr.api.then(|| {
            Arc::new(crate::broker::Broker::new(
                crate::broker::Admission::Pod(pod.uid.clone()),
                self.audit.clone(),
                vid.to_owned(),
                Some(pod.audit_ref()),
            ))
        });
        let volume: Box<dyn Volume> = match &broker {
            Some(b) => Box::new(crate::broker::Serving::new(volume, b.clone())),
            None => volume,
        };
        if let Err(e) = volume.apply(&rendered.files) {
            return Err(abandon(volume, e.to_string()));
        }
        // The broker socket: in the volume's own tmpfs (written through the staging mount,
        // seen by the pod at the target), bound before the publish returns so the pod finds it
        // at start. Any uid may connect; the caller's cgroup decides who is served.
        let bound = match broker {
            None => None,
            Some(b) => {
                let sock = mountpoint::staging_dir(&self.staging_root(), target)
                    .join(crate::broker::NODE_SOCKET);
                match keybroker_csi::broker::bind(&sock, 0o666).await {
                    Ok(bound) => Some((bound, b)),
                    Err(e) => {
                        return Err(abandon(
                            volume,
                            format!("cannot create the broker API socket in the volume: {e}"),
                        ));
                    }
                }
            }
        };
        let _ = refresher.refresh(volume.as_ref()).await;
        // Rotation notices to the pod's own processes (through hostPID, checked by cgroup).
        let volume: Box<dyn Volume> = if vr.on_change.is_empty() {
            volume
        } else {
            let (actions, uid, audit, volume_id) = (
                vr.on_change.clone(),
                pod.uid.clone(),
                self.audit.clone(),
                vid.to_owned(),
            );
            let pod_ref = pod.audit_ref();
            Box::new(crate::volume::Notifying::new(volume, move |changed| {
                for (process, signal) in &actions {
                    let res = crate::notify::signal_by_name(process, *signal, Some(&uid));
                    let mut ev = Event::new(EventKind::Rotate)
                        .volume(volume_id.clone())
                        .pod(pod_ref.clone())
                        .detail(format!(
                            "onChange signal {signal} to {process} after {} changed files",
                            changed.len()
                        ));
                    if let Err(e) = &res {
                        tracing::warn!(volume_id = %volume_id, error = %e, "rotation notice failed");
                        ev = ev.outcome(Outcome::Failure).error(e);
                    }
                    audit.record(ev);
                }
            }))
        };
        let cancel = CancellationToken::new();
        let api = bound.map(|(bound, b)| {
            let stop = cancel.clone();
            let volume_id = vid.to_owned();
            tokio::spawn(async move {
                let res =
                    keybroker_csi::broker::serve_bound(bound, b, stop.cancelled_owned()).await;
                if let Err(e) = res {
                    tracing::error!(volume_id = %volume_id, error = %e, "the volume's broker API stopped");
                }
            })
        });
        if let Some(s) = session {
            self.keep_session(target, s);
        }
        let keys = refresher.keys();
        let status = refresher.status();
        let poll = self.cfg.poll;
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            refresher.run(volume.as_ref(), c, poll).await;
            volume
        });
        lock(&self.volumes).insert(
            target.to_owned(),
            Published {
                volume_id: vid.to_owned(),
                digest: vr.digest.clone(),
                pod: pod.clone(),
                binding: grant.binding.clone(),
                identity: identity.clone(),
                provider: provider.clone(),
                keys,
                status,
                cancel,
                task,
                api,
            },
        );
        self.metrics.publishes.fetch_add(1, Ordering::Relaxed);
        self.audit.record(
            Event::new(EventKind::Mount)
                .volume(vid)
                .pod(pod.audit_ref())
                .identity(identity)
                .provider(provider.kind())
                .detail(format!(
                    "binding {}; {} files; {}",
                    grant.binding,
                    rendered.files.len(),
                    vr.kind
                ))
                .latency(started.elapsed()),
        );
        tracing::info!(volume_id = vid, pod = %pod, binding = %grant.binding, kind = %vr.kind, "published");
        Ok(())
    }

    async fn do_unpublish(&self, req: UnpublishRequest) -> Result<(), NodeError> {
        let target = req.target_path;
        let tlock = self.target_lock(&target);
        let _held = tlock.lock().await;
        // The record goes first: a crash after this leaves at most a mount without a record,
        // which kubelet's retried unpublish (or the next publish there) cleans.
        let _ = std::fs::remove_file(record_path(&self.cfg.state_dir, &target));
        self.forget_session(&target);
        let entry = lock(&self.volumes).remove(&target);
        let mut ev = Event::new(EventKind::Unmount).volume(req.volume_id.clone());
        match entry {
            Some(p) => {
                self.metrics.rotations_retired.fetch_add(
                    p.status.rotations.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                p.cancel.cancel();
                if let Some(api) = p.api {
                    let _ = api.await;
                }
                match p.task.await {
                    Ok(volume) => {
                        if let Err(e) = volume.unmount() {
                            tracing::warn!(error = %e, "unmount reported an error; detaching");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the volume's task failed; detaching");
                    }
                }
                // Anything stacked under or over it by a crashed process goes too.
                let extra = detach_all(&self.staging_root(), &target);
                if extra > 0 {
                    tracing::warn!(target = %target.display(), mounts = extra, "detached keybroker mounts stacked at the target");
                }
                ev.pod = Some(p.pod.audit_ref());
                ev.detail = Some(format!("binding {}", p.binding));
                tracing::info!(volume_id = %p.volume_id, pod = %p.pod, "unpublished");
            }
            None => {
                // Unknown to this process: a leftover of a previous one, or nothing at all.
                detach_all(&self.staging_root(), &target);
                ev.detail = Some("no volume of this process was published there".into());
            }
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "cannot remove the target directory")
            }
        }
        self.release_unused().await;
        self.metrics.unpublishes.fetch_add(1, Ordering::Relaxed);
        self.audit.record(ev);
        lock(&self.target_locks).remove(&target);
        if let Some(release) = self.cfg.release_memory {
            // Once unpublishes have been quiet for a second, the freed heap goes back.
            let seen = self.unpublished.fetch_add(1, Ordering::Relaxed) + 1;
            let count = self.unpublished.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if count.load(Ordering::Relaxed) == seen {
                    let _ = tokio::task::spawn_blocking(release).await;
                }
            });
        }
        Ok(())
    }

    /// Drops cached values no published volume needs any more (zeroized on drop), revokes
    /// their leases, and logs out of Vault identities no volume uses.
    async fn release_unused(&self) {
        let pending: HashMap<PathBuf, String> = lock(&self.publishing).clone();
        let (in_use, identities, providers) = {
            let vols = lock(&self.volumes);
            let keys: std::collections::HashSet<CacheKey> =
                vols.values().flat_map(|p| p.keys.iter().cloned()).collect();
            let ids: std::collections::HashSet<String> = vols
                .values()
                .map(|p| p.identity.clone())
                .chain(pending.values().cloned())
                .collect();
            let providers: HashMap<String, Arc<dyn Provider>> = vols
                .values()
                .map(|p| (p.identity.clone(), p.provider.clone()))
                .collect();
            (keys, ids, providers)
        };
        // Values of identities with a publish in flight stay: that volume is about to use them.
        let evicted = self
            .cache
            .retain(|k| in_use.contains(k) || pending.values().any(|i| *i == k.identity));
        let targets: std::collections::HashSet<String> = lock(&self.volumes)
            .keys()
            .chain(pending.keys())
            .map(|t| t.to_string_lossy().into_owned())
            .collect();
        let idle: Vec<Arc<VaultProvider>> = {
            let mut vaults = lock(&self.vaults);
            let idle_keys: Vec<String> = vaults
                .keys()
                .filter(|k| !identities.contains(*k))
                .cloned()
                .collect();
            for p in vaults.values() {
                p.retain_jwts(|volume| targets.contains(volume));
            }
            idle_keys.iter().filter_map(|k| vaults.remove(k)).collect()
        };
        {
            // Azure identities no volume uses are dropped (their token refresh stops with them).
            let mut azures = lock(&self.azures);
            azures.retain(|k, _| identities.contains(k));
            for p in azures.values() {
                p.tokens().retain_jwts(|volume| targets.contains(volume));
            }
            let used: std::collections::HashSet<*const azure::TokenSource> =
                azures.values().map(|p| Arc::as_ptr(p.tokens())).collect();
            lock(&self.managed_tokens).retain(|_, t| used.contains(&Arc::as_ptr(t)));
        }
        for (key, object) in evicted {
            if object.lease.is_none() {
                continue;
            }
            let provider: Option<Arc<dyn Provider>> =
                providers.get(&key.identity).cloned().or_else(|| {
                    idle.iter()
                        .find(|p| p.identity() == key.identity)
                        .map(|p| p.clone() as Arc<dyn Provider>)
                });
            if let Some(p) = provider {
                p.release(&object).await;
            }
        }
        for p in idle {
            p.revoke().await;
        }
    }

    /// Keeps a FUSE session's descriptor: at the keeper (so the connection outlives this
    /// process) and here (for a handover).
    fn keep_session(&self, target: &Path, s: Session) {
        if let Some(k) = &self.cfg.keeper
            && let Err(e) = k.put(&s.key, s.fd.as_fd())
        {
            tracing::warn!(target = %target.display(), error = %e, "the fd keeper does not hold the FUSE session; the volume will not survive a crash until it does (given again when the keeper answers)");
        }
        lock(&self.sessions).insert(target.to_owned(), s);
    }

    fn forget_session(&self, target: &Path) {
        let gone = lock(&self.sessions).remove(target);
        if let (Some(s), Some(k)) = (gone, &self.cfg.keeper)
            && let Err(e) = k.drop_fd(&s.key)
        {
            tracing::warn!(target = %target.display(), error = %e, "cannot tell the fd keeper to close a session (it closes it itself once the connection ends)");
        }
    }

    /// Gives the keeper every session it lacks (it restarted, or this process took the
    /// sessions over from another one with a keeper of its own). Returns how many were given.
    pub fn sync_keeper(&self, all: bool) -> usize {
        let Some(k) = &self.cfg.keeper else { return 0 };
        let sessions = lock(&self.sessions);
        // `announce`: this process is the keeper's node from now on (a keeper a previous node
        // started stays as long as this one lives).
        let held = match k.announce() {
            Ok(n) => n,
            Err(e) => {
                if !sessions.is_empty() {
                    tracing::warn!(error = %e, sessions = sessions.len(), "the fd keeper does not answer: FUSE volumes will not survive a crash of this process until it does");
                }
                return 0;
            }
        };
        let listeners = lock(&self.listeners);
        if !all && held >= sessions.len() + listeners.len() {
            return 0;
        }
        for (name, fd) in listeners.iter() {
            if let Err(e) = k.put(name, fd.as_fd()) {
                tracing::warn!(socket = %name, error = %e, "cannot give the fd keeper a listening socket");
            }
        }
        let mut given = 0;
        for (target, s) in sessions.iter() {
            match k.put(&s.key, s.fd.as_fd()) {
                Ok(_) => given += 1,
                Err(e) => {
                    tracing::warn!(target = %target.display(), error = %e, "cannot give the fd keeper a FUSE session")
                }
            }
        }
        if given > 0 && !all {
            tracing::warn!(
                sessions = given,
                "the fd keeper had lost FUSE sessions (restarted?); given again"
            );
        }
        given
    }

    /// Gives the fd keeper a listening socket to keep for the next process (and again to a
    /// restarted keeper, or to one that answers only later).
    pub fn keep_listener(&self, name: &str, fd: std::os::fd::OwnedFd) {
        let Some(k) = &self.cfg.keeper else {
            return;
        };
        if let Err(e) = k.put(name, fd.as_fd()) {
            tracing::warn!(socket = name, error = %e, "the fd keeper does not keep this listening socket yet; given once it answers");
        }
        lock(&self.listeners).push((name.to_owned(), fd));
    }

    /// kubelet registered the plugin with a previous process, whose registration socket this
    /// one serves now (kept by the fd keeper): the registration stands.
    pub fn registration_continues(&self) {
        tracing::info!(
            driver = keybroker_csi::DRIVER_NAME,
            "kubelet's registration of the plugin continues (its socket was kept)"
        );
        *lock(&self.kubelet) = Some(Ok(()));
    }

    /// Keeps the fd keeper in step every few seconds, until `shutdown`.
    pub fn watch_keeper(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.cfg.keeper.is_none() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || n.sync_keeper(false)).await;
            }
        });
    }

    /// Takes over the volumes a previous keybroker process published (from the state
    /// directory): tmpfs volumes keep being served; FUSE sessions whose descriptor came back
    /// (`sessions`, from the keeper or a handover, by record key) are served again without a
    /// new INIT; other FUSE mounts are dead and replaced. Descriptors of no recorded volume are
    /// closed. Every outcome is audited.
    pub async fn recover(&self, mut sessions: BTreeMap<String, std::os::fd::OwnedFd>) {
        let dir = self.cfg.state_dir.join("volumes");
        let mut taken_over = Vec::new();
        let mut records = Vec::new();
        // Every volume with a record file, readable or not: its staging mount is not an orphan.
        let mut recorded = std::collections::BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    // A record half written when a process died: the complete one is beside it.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                if let Some(stem) = path.file_stem() {
                    recorded.insert(stem.to_string_lossy().into_owned());
                }
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                match serde_json::from_slice::<VolumeRecord>(&bytes) {
                    Ok(rec) => records.push(rec),
                    Err(_) => {
                        tracing::warn!(file = %path.display(), "unreadable volume record; ignored")
                    }
                }
            }
        }
        // A staging tmpfs no record names: a crash inside an unpublish (the record goes first).
        // It is this node's own (its state directory), so it is detached with its target binds.
        let (orphans, detached) =
            mountpoint::detach_orphan_staging(&self.staging_root(), &recorded);
        for dir in orphans {
            tracing::warn!(staging = %dir.display(), mounts = detached, "tmpfs volume of no recorded volume (unpublished during a restart) detached");
            self.audit.record(
                Event::new(EventKind::Unmount)
                    .volume(format!("staging:{}", dir.display()))
                    .detail("tmpfs volume of no recorded volume (unpublished during a restart) detached with its target"),
            );
        }
        for rec in records {
            let session = sessions.remove(&record_key(&rec.target));
            match self.recover_one(&rec, session).await {
                Ok(how) => {
                    if how == TAKEN_OVER {
                        taken_over.push(rec.volume_id.clone());
                    }
                    tracing::info!(volume_id = %rec.volume_id, target = %rec.target.display(), "{how}");
                }
                Err(err) => {
                    tracing::error!(volume_id = %rec.volume_id, target = %rec.target.display(), error = %err, "cannot recover the volume; kubelet's next republish will retry");
                }
            }
        }
        for (key, fd) in sessions {
            // Unpublished while no process ran (its record went first): its connection is
            // closed with the last descriptor.
            drop(fd);
            if let Some(k) = &self.cfg.keeper {
                let _ = k.drop_fd(&key);
            }
            self.audit
                .record(Event::new(EventKind::Unmount).volume(key.clone()).detail(
                    "FUSE session of no recorded volume (unpublished during a restart) closed",
                ));
        }
        self.sync_keeper(true);
        if !taken_over.is_empty() && self.opens.is_some() {
            // Between the previous process's last record and now nobody watched these volumes.
            taken_over.sort();
            self.audit.record(
                Event::new(EventKind::Gap)
                    .outcome(Outcome::Failure)
                    .detail(format!(
                        "keybroker restarted: opens of tmpfs volumes {} between {} and {} were not audited",
                        taken_over.join(", "),
                        self.audit
                            .previous_last_time()
                            .unwrap_or("the previous process's end"),
                        humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    )),
            );
        }
        self.ready.store(true, Ordering::Relaxed);
    }

    async fn recover_one(
        &self,
        rec: &VolumeRecord,
        session: Option<std::os::fd::OwnedFd>,
    ) -> Result<&'static str, NodeError> {
        let mut vr = request::parse(
            &rec.attributes,
            &Default::default(),
            self.cfg.default_kind,
            self.cfg.limits,
        )
        .map_err(|e| NodeError::InvalidArgument(e.0))?;
        // The type the volume was mounted with, whatever this process's default (a volume
        // without `volumeType` published before the default changed stays what it is).
        vr.kind = rec.kind;
        let grant = self
            .bindings
            .load()
            .authorize(&vr)
            .map_err(|why| self.deny(Some(&vr.pod), &rec.volume_id, why))?;
        let provider = self.provider_for(&grant, &vr, &rec.target)?;
        let staging = mountpoint::staging_dir(&self.staging_root(), &rec.target);
        let pod = vr.pod.clone();
        let adopt = match (rec.kind, &rec.fuse, session) {
            (VolumeKind::Tmpfs, _, _)
                if target_alive(&rec.target)
                    && mountpoint::mount_at(&staging)
                        .is_some_and(|m| mountpoint::is_keybroker_mount(&m)) =>
            {
                Some(Adopt::Tmpfs(TmpfsVolume::adopt(
                    &rec.target,
                    &staging,
                    Owner { uid: 0, gid: 0 },
                )))
            }
            // The descriptor must be the connection still mounted at the target.
            (VolumeKind::Fuse, Some(fr), Some(fd))
                if crate::volume::fuse::connection_id(&rec.target) == Some(fr.conn)
                    && !crate::keeper::ended(fd.as_fd()) =>
            {
                Some(Adopt::Fuse {
                    fd,
                    rec: fr.clone(),
                })
            }
            _ => {
                detach_all(&self.staging_root(), &rec.target);
                None
            }
        };
        let how = match &adopt {
            Some(Adopt::Tmpfs(_)) => Some("tmpfs volume taken over after a keybroker restart"),
            Some(Adopt::Fuse { .. }) => Some(
                "FUSE session taken over after a keybroker restart (readers waited, none saw an error)",
            ),
            None => None,
        };
        let res = self
            .mount_new(
                &rec.volume_id,
                &rec.target,
                vr,
                grant,
                provider,
                Instant::now(),
                adopt,
            )
            .await;
        if let Err(e) = res {
            if rec.kind == VolumeKind::Fuse {
                // A session nobody serves would make its readers wait forever: end it.
                detach_all(&self.staging_root(), &rec.target);
            }
            return Err(e);
        }
        if let Some(how) = how {
            self.audit.record(
                Event::new(EventKind::Mount)
                    .volume(rec.volume_id.clone())
                    .pod(pod.audit_ref())
                    .detail(how),
            );
            return Ok(if rec.kind == VolumeKind::Tmpfs {
                TAKEN_OVER
            } else {
                FUSE_TAKEN_OVER
            });
        }
        if rec.kind == VolumeKind::Fuse {
            let msg = "FUSE volume was served by the previous keybroker process and no fd keeper kept its \
                       session; remounted. Containers that already had it mounted see a dead mount \
                       (ENOTCONN) until the pod restarts";
            tracing::error!(volume_id = %rec.volume_id, pod = %pod, "{msg}");
            self.audit.record(
                Event::new(EventKind::Error)
                    .volume(rec.volume_id.clone())
                    .pod(pod.audit_ref())
                    .detail(msg)
                    .outcome(Outcome::Failure),
            );
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            return Ok("FUSE volume remounted after restart (running containers must restart)");
        }
        Ok("volume remounted after restart")
    }

    /// Process shutdown: stops every refresher, then every FUSE session between two requests.
    /// Mounts stay: tmpfs volumes with their content, FUSE sessions held by the fd keeper
    /// (their readers wait in the kernel until the next process serves them). A newer
    /// process that asked for a handover gets the sessions now.
    pub async fn shutdown(&self) {
        let all: Vec<Published> = lock(&self.volumes).drain().map(|(_, p)| p).collect();
        for p in all {
            p.cancel.cancel();
            if let Ok(volume) = p.task.await {
                drop(volume);
            }
        }
        if let Some(o) = &self.opens {
            // Open windows are recorded; tmpfs volumes stay mounted, unaudited until the next
            // process takes them over (it records the gap). Before FUSE stops: the listener
            // may take a moment to stop, and FUSE readers are still served meanwhile.
            o.stop();
        }
        // From here FUSE readers wait for the next process.
        let left = crate::volume::fuse_mux::stop_serving(Duration::from_secs(2));
        if left > 0 {
            tracing::error!(
                sessions = left,
                "FUSE sessions still busy after 2 s; exiting anyway"
            );
        }
        for s in lock(&self.sessions).values() {
            s.fs.flush_reads(true);
        }
        if lock(&self.handover).is_some() {
            self.audit
                .record(Event::new(EventKind::Unmount).detail(format!(
                "handing {} FUSE sessions and every tmpfs volume over to a newer keybroker process",
                lock(&self.sessions).len()
            )));
        }
    }

    /// Sends the sessions to the process that asked for a handover (after [`Self::shutdown`]
    /// and the audit log's last flush). True when one was asked for.
    pub fn complete_handover(&self) -> bool {
        let Some(conn) = lock(&self.handover).take() else {
            return false;
        };
        let sessions = lock(&self.sessions);
        let res = crate::keeper::send_all(
            conn.as_fd(),
            sessions.values().map(|s| (s.key.as_str(), s.fd.as_fd())),
        );
        match res {
            Ok(()) => tracing::info!(sessions = sessions.len(), "volumes handed over"),
            Err(e) => {
                tracing::error!(error = %e, "the handover failed; the fd keeper still holds the sessions")
            }
        }
        true
    }

    /// Called by the handover listener: a newer process takes over at this one's shutdown.
    pub fn hand_over_to(&self, conn: std::os::fd::OwnedFd) {
        *lock(&self.handover) = Some(conn);
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
        let started = Instant::now();
        let res = self.do_publish(req).await;
        self.metrics.observe_publish(started.elapsed(), res.is_ok());
        res
    }

    async fn unpublish(&self, req: UnpublishRequest) -> Result<(), NodeError> {
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
