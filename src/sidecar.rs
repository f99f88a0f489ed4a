//! `keybroker sidecar` and `keybroker init`: keybroker inside the pod, as the pod.
//!
//! No node privileges: the files go into a directory the pod shares (an `emptyDir` with
//! `medium: Memory`) with kubelet's atomic-writer layout (the tmpfs volume's writer, without a
//! mount), the identity is the pod's own (its projected token file for Vault, the workload
//! identity webhook's environment for Azure, re-read as kubelet rotates them), and the same
//! content model, cache, rotation rules and audit as every other keybroker volume apply.
//!
//! `init` writes once and exits (non-zero naming the object on failure); `sidecar` writes, turns
//! ready (`/readyz` on `--health-addr`, or `keybroker probe --dir`), keeps the files fresh and
//! runs the config's `onChange` actions after each complete write that changed something.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event, EventKind, Outcome};
use crate::broker::{Admission, Broker};
use crate::cache::FetchCache;
use crate::config::{ChangeAction, MountConfig, ProviderConfig};
use crate::provider::{PodJwt, Provider};
use crate::refresh::Refresher;
use crate::volume::content::RenderedFile;
use crate::volume::tmpfs::{DATA_LINK, TmpfsVolume};
use crate::volume::{Owner, Volume, VolumeError, VolumeKind};

/// The writer, shared by the first write and the refresher's notifying volume; every write
/// also updates what the broker API serves.
struct Shared(Arc<TmpfsVolume>, Arc<Broker>);

impl Volume for Shared {
    fn kind(&self) -> VolumeKind {
        VolumeKind::Tmpfs
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let changed = self.0.apply(files)?;
        self.1.update(files, !changed.is_empty());
        Ok(changed)
    }

    fn tick(&self) {
        self.1.flush_gets();
    }

    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        Ok(())
    }
}

/// How often a token file is looked at for kubelet's rotation.
const TOKEN_FILE_CHECK: Duration = Duration::from_secs(10);

/// The `exp` claim of a JWT (not verified: the party the token is for verifies it).
pub fn jwt_expiry(jwt: &str) -> Option<SystemTime> {
    use base64::Engine;
    let claims = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(v["exp"].as_u64()?))
}

fn read_token(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let t = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the service-account token file {}: {e}",
            path.display()
        )
    })?);
    let trimmed = zeroize::Zeroizing::new(t.trim().to_owned());
    if trimmed.is_empty() || trimmed.len() > 16 * 1024 {
        anyhow::bail!(
            "the service-account token file {} is empty or larger than 16 KiB",
            path.display()
        );
    }
    Ok(trimmed)
}

/// Feeds `set` the token in `path` now and whenever kubelet rewrites it.
fn watch_token_file(
    path: PathBuf,
    set: impl Fn(PodJwt) + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let give = move |jwt: zeroize::Zeroizing<String>, set: &dyn Fn(PodJwt)| {
        set(PodJwt {
            pod: "this pod".into(),
            expires: jwt_expiry(&jwt),
            jwt,
        })
    };
    let first = read_token(&path)?;
    let mut last = first.clone();
    give(first, &set);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TOKEN_FILE_CHECK) => {}
            }
            match read_token(&path) {
                Ok(t) if t != last => {
                    last = t.clone();
                    give(t, &set);
                    tracing::info!(file = %path.display(), "service-account token rotated by kubelet");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "keeping the last service-account token"),
            }
        }
    });
    Ok(())
}

/// The provider a config names, acting as this process's pod (Vault, Azure) or reading local
/// files. Token files are watched until `stop`.
pub fn build_provider(
    cfg: &MountConfig,
    stop: CancellationToken,
) -> anyhow::Result<Arc<dyn Provider>> {
    use crate::provider::azure::{self, AzureProvider};
    use crate::provider::vault::{self, VaultProvider};
    let read_ca = |f: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
        f.as_ref()
            .map(|f| {
                std::fs::read(f)
                    .map_err(|e| anyhow::anyhow!("cannot read the CA file {}: {e}", f.display()))
            })
            .transpose()
    };
    Ok(match &cfg.provider {
        ProviderConfig::Local { path } => Arc::new(crate::provider::local::LocalProvider::open(
            path,
            cfg.content.limits.max_object_bytes,
        )?),
        ProviderConfig::Vault {
            address,
            auth_mount,
            role,
            namespace,
            ca_file,
            tls_server_name,
            token_file,
        } => {
            let endpoint = vault::Endpoint {
                address: address.clone(),
                namespace: namespace.clone(),
                ca_pem: read_ca(ca_file)?,
                tls_server_name: tls_server_name.clone(),
                timeout: Duration::from_secs(15),
            };
            let login = vault::LoginConfig {
                auth_mount: auth_mount.clone(),
                role: role.clone(),
                identity: format!("vault role {role}"),
            };
            let p = VaultProvider::new(&endpoint, login).map_err(|e| anyhow::anyhow!("{e}"))?;
            let q = p.clone();
            watch_token_file(
                token_file.clone(),
                move |j| q.set_jwt("token-file", j),
                stop,
            )?;
            p
        }
        ProviderConfig::Azure {
            tenant_id,
            client_id,
            token_file,
            managed_identity,
            authority_host,
            keyvault_dns_suffix,
            ca_file,
            ..
        } => {
            let ca = read_ca(ca_file)?;
            let http =
                crate::tls::azure_client(ca.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let source = match managed_identity {
                Some(mi) => azure::Source::Managed {
                    client_id: mi.clone(),
                    endpoint: managed_endpoint()?,
                },
                None => azure::Source::Federated {
                    authority: authority_host.clone(),
                    tenant: tenant_id.clone(),
                    client_id: client_id.clone().unwrap_or_default(),
                    jwts: Default::default(),
                },
            };
            let tokens =
                azure::TokenSource::new(source, http.clone(), format!("azure tenant {tenant_id}"));
            if let Some(f) = token_file {
                let t = tokens.clone();
                watch_token_file(f.clone(), move |j| t.set_jwt("token-file", j), stop)?;
            }
            let access = azure::VaultAccess {
                verify_challenge_resource: crate::node::bindings::AZURE_CLOUD_KEYVAULT_SUFFIXES
                    .contains(&keyvault_dns_suffix.as_str()),
                dns_suffix: keyvault_dns_suffix.clone(),
            };
            AzureProvider::new(tokens, http, access)
        }
    })
}

/// IMDS, or the App Service endpoint when the platform set `IDENTITY_ENDPOINT`.
fn managed_endpoint() -> anyhow::Result<crate::provider::azure::ManagedEndpoint> {
    use crate::provider::azure::ManagedEndpoint;
    Ok(match std::env::var("IDENTITY_ENDPOINT") {
        Ok(endpoint) => ManagedEndpoint::AppService {
            endpoint,
            header: Arc::new(zeroize::Zeroizing::new(
                std::env::var("IDENTITY_HEADER").map_err(|_| {
                    anyhow::anyhow!("IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not")
                })?,
            )),
        },
        Err(_) => ManagedEndpoint::Imds {
            base: std::env::var("KEYBROKER_AZURE_IMDS")
                .unwrap_or_else(|_| "http://169.254.169.254".into()),
        },
    })
}

/// The pod's identity for audit records, from the downward API environment
/// (`POD_NAMESPACE`, `POD_NAME`, `POD_UID`, `POD_SERVICE_ACCOUNT`).
fn pod_from_env() -> Option<crate::audit::PodRef> {
    let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    Some(crate::audit::PodRef {
        namespace: v("POD_NAMESPACE")?,
        name: v("POD_NAME")?,
        uid: v("POD_UID").unwrap_or_default(),
        service_account: v("POD_SERVICE_ACCOUNT").unwrap_or_default(),
    })
}

/// Runs the config's actions after a write that changed `changed`, auditing each outcome.
async fn notify(actions: &[ChangeAction], changed: &[String], audit: &AuditLog, volume: &str) {
    for a in actions {
        let (what, res) = match a {
            ChangeAction::Signal { process, signal } => (
                format!("signal {signal} to {process}"),
                crate::notify::signal_by_name(process, *signal, None),
            ),
            ChangeAction::Http {
                url,
                method,
                timeout,
            } => (
                format!("{method} {url}"),
                crate::notify::http_notice(url, method, *timeout).await,
            ),
        };
        let mut ev = Event::new(EventKind::Rotate)
            .volume(volume.to_owned())
            .detail(format!(
                "onChange {what} after {} changed files",
                changed.len()
            ));
        match &res {
            Ok(()) => tracing::info!(action = %what, "rotation notice sent"),
            Err(e) => {
                tracing::warn!(action = %what, error = %e, "rotation notice failed");
                ev = ev.outcome(Outcome::Failure).error(e);
            }
        }
        audit.record(ev);
    }
}

/// How `init` and `sidecar` run.
pub struct Options {
    pub config: PathBuf,
    pub dir: PathBuf,
    /// `init`: write once and exit.
    pub once: bool,
    /// `/readyz` (and `/healthz`) on this address (sidecar).
    pub health_addr: Option<String>,
    pub audit_path: Option<PathBuf>,
    /// Serve the broker API on this socket (sidecar), to these caller uids.
    pub api_socket: Option<PathBuf>,
    pub api_uids: Vec<u32>,
}

/// Runs `init` or `sidecar` until done or `shutdown`.
pub async fn run(opts: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut cfg = MountConfig::load(&opts.config)?;
    if let Some(a) = &opts.audit_path {
        cfg.audit_path = a.clone();
    }
    std::fs::create_dir_all(&opts.dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", opts.dir.display()))?;
    // `-`: JSON lines on stdout, for the cluster's log pipeline.
    let audit = if cfg.audit_path == Path::new("-") {
        AuditLog::stdout(cfg.fail_closed)?
    } else {
        AuditLog::open_keyed(&cfg.audit_path, cfg.fail_closed, None)?
    };
    let volume_id = opts.dir.display().to_string();
    let pod = pod_from_env();
    let stop = shutdown.child_token();
    let provider = build_provider(&cfg, stop.clone())?;
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = &opts.health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tokio::spawn(health(listener, ready.clone(), stop.clone()));
    }
    let cache = Arc::new(FetchCache::new(cfg.poll));
    let mut refresher = Refresher::new(
        volume_id.clone(),
        cfg.content.clone(),
        provider.clone(),
        provider.kind(),
        cache,
        audit.clone(),
    );
    if let Some(p) = pod.clone() {
        refresher = refresher.with_pod(p);
    }
    let owner = Owner {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = Arc::new(TmpfsVolume::at(&opts.dir, owner, false));
    let broker = Arc::new(Broker::new(
        Admission::Uids(if opts.api_uids.is_empty() {
            vec![owner.uid]
        } else {
            opts.api_uids.clone()
        }),
        audit.clone(),
        volume_id.clone(),
        pod.clone(),
    ));
    let volume = crate::volume::Notifying::new(
        Box::new(Shared(writer.clone(), broker.clone())),
        move |changed| {
            let _ = tx.send(changed);
        },
    );
    first_write(
        &refresher,
        &writer,
        &broker,
        &opts,
        &audit,
        provider.kind(),
        &pod,
        &shutdown,
    )
    .await?;
    refresher.refresh(&volume).await.ok();
    while rx.try_recv().is_ok() {}
    let mut ev = Event::new(EventKind::Mount)
        .volume(volume_id.clone())
        .provider(provider.kind())
        .detail(if opts.once {
            "init: files written"
        } else {
            "sidecar: files written"
        });
    ev.pod = pod.clone();
    audit.record(ev);
    ready.store(true, Ordering::Relaxed);
    tracing::info!(dir = %opts.dir.display(), files = cfg.content.files.len(), "files written");
    if opts.once {
        stop.cancel();
        audit.close();
        return Ok(());
    }
    if let Some(sock) = &opts.api_socket {
        serve_api(sock, broker.clone(), stop.clone());
    }
    let notices = spawn_notices(&cfg, rx, audit.clone(), volume_id.clone());
    refresher.run(&volume, shutdown, cfg.poll).await;
    stop.cancel();
    drop(volume);
    let _ = notices.await;
    audit.close();
    Ok(())
}

/// The first complete write: until it succeeds nothing is ready (sidecar retries with the
/// provider's backoff; init gives up at once, naming the object).
#[allow(clippy::too_many_arguments)]
async fn first_write(
    refresher: &Refresher,
    writer: &TmpfsVolume,
    broker: &Broker,
    opts: &Options,
    audit: &AuditLog,
    provider: &'static str,
    pod: &Option<crate::audit::PodRef>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let volume_id = opts.dir.display().to_string();
    let mut failures = 0u32;
    loop {
        match refresher.render().await {
            Ok(r) => {
                writer.apply(&r.files)?;
                broker.update(&r.files, true);
                return Ok(());
            }
            Err(e) if opts.once => {
                let mut ev = Event::new(EventKind::Mount)
                    .volume(volume_id.clone())
                    .provider(provider)
                    .error(&e);
                ev.pod = pod.clone();
                audit.record(ev);
                audit.close();
                anyhow::bail!("no files were written to {}: {e}", opts.dir.display());
            }
            Err(e) => {
                failures += 1;
                let wait = crate::rotation::backoff(failures, None, fastrand::f64());
                tracing::warn!(error = %e, retry_in = ?wait, "first write failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("stopped before the first write: {e}"),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Serves the broker API on `sock` until `stop`.
fn serve_api(sock: &Path, broker: Arc<Broker>, stop: CancellationToken) {
    let path = sock.to_owned();
    tokio::spawn(async move {
        let sock = path;
        // 0666: any local user may connect; the uid check decides who is served.
        if let Err(e) =
            keybroker_csi::broker::serve(
                &sock,
                0o666,
                broker,
                async move { stop.cancelled().await },
            )
            .await
        {
            tracing::error!(socket = %sock.display(), error = %e, "the broker API stopped");
        }
    });
    tracing::info!(socket = %sock.display(), "serving the broker API");
}

/// Runs the `onChange` actions (the volume's, and each file's own) as changes arrive.
fn spawn_notices(
    cfg: &MountConfig,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
    audit: AuditLog,
    volume_id: String,
) -> tokio::task::JoinHandle<()> {
    let actions = cfg.on_change.clone();
    let file_actions = cfg.file_on_change.clone();
    tokio::spawn(async move {
        while let Some(changed) = rx.recv().await {
            notify(&actions, &changed, &audit, &volume_id).await;
            // A file's own actions, when that file (or a version under it) changed.
            for (file, acts) in &file_actions {
                let prefix = format!("{file}/");
                if changed.iter().any(|c| c == file || c.starts_with(&prefix)) {
                    notify(acts, std::slice::from_ref(file), &audit, &volume_id).await;
                }
            }
        }
    })
}

async fn health(
    listener: tokio::net::TcpListener,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let Ok((mut s, _)) = conn else { continue };
        let ready = ready.clone();
        tokio::spawn(async move {
            // The request line may arrive in pieces: read until the end of the headers (or
            // 1 KiB, or 2 s).
            let mut buf = [0u8; 1024];
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, s.read(&mut buf[n..])).await {
                    Ok(Ok(m)) if m > 0 => n += m,
                    _ => break,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let ok = match req.split(' ').nth(1) {
                Some("/healthz") => true,
                Some("/readyz") => ready.load(Ordering::Relaxed),
                _ => false,
            };
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
    }
}

/// `keybroker probe --dir DIR`: whether the first complete write happened.
pub fn probe(dir: &Path) -> bool {
    std::fs::metadata(dir.join(DATA_LINK)).is_ok_and(|m| m.is_dir())
}
