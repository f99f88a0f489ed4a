//! What `node` and `provider` share: their common flags and the daemon's run (handover, audit
//! log, metrics, recovery, serving CSI or the provider API, shutdown).

use std::path::PathBuf;

use super::shutdown_on_signals;

/// How long in-flight CSI calls may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What `node` and `provider` share: bindings, audit, metrics, polling, Azure endpoints.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Identity bindings (YAML), reloaded when it changes; see `keybroker check --help`.
    #[arg(long, default_value = "/etc/keybroker/bindings.yaml")]
    pub bindings: PathBuf,
    /// The audit log (JSON lines, hash-chained).
    #[arg(long, default_value = "/var/log/keybroker/audit.jsonl")]
    pub audit_log: PathBuf,
    /// Key the audit chain with HMAC-SHA256 (a file of 64 hex digits or >= 32 bytes):
    /// forging, truncating or re-chaining the log then needs the key.
    #[arg(long, env = "KEYBROKER_AUDIT_KEY_FILE")]
    pub audit_key: Option<PathBuf>,
    /// Sign the audit log with this Ed25519 private key (PKCS#8 PEM: `openssl genpkey
    /// -algorithm ed25519 -out FILE`): a checkpoint every 5 s and before every seal, and the
    /// head anchor. Auditors verify with the public key alone (`keybroker audit verify
    /// --public-key`), which cannot forge. Excludes --audit-key.
    #[arg(
        long,
        env = "KEYBROKER_AUDIT_SIGNING_KEY_FILE",
        conflicts_with = "audit_key"
    )]
    pub audit_signing_key: Option<PathBuf>,
    /// While the audit log cannot be written: refuse FUSE and node tmpfs opens (EIO, EPERM)
    /// and new publishes or Mounts (Unavailable); opens also wait for their record to be
    /// written. Serving resumes once a write succeeds again (docs/SECURITY.md).
    #[arg(long)]
    pub audit_fail_closed: bool,
    /// Seal the audit log's active segment into `<log>.<first record, 20 digits>` once it
    /// holds this much (bytes; K, M, G, KiB, MiB, GiB suffixes). The chain runs on across
    /// segments; `keybroker audit verify` checks them all.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub audit_max_segment_bytes: u64,
    /// ... or once its first record is this old (e.g. 24h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub audit_max_segment_age: std::time::Duration,
    /// How much sealed audit log to keep: a total size, an age, or both (`1GiB,90d`); the
    /// oldest whole segments past it are deleted after a `prune` record names them (so
    /// verification tells pruning from tampering). `forever` keeps everything (the disk
    /// then fills: a full disk stops writes, and with --audit-fail-closed serving).
    #[arg(long, default_value = "1GiB,90d", value_parser = parse_retain)]
    pub audit_retain: Retain,
    /// Prometheus metrics and health endpoints (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9808")]
    pub metrics_addr: String,
    /// Refresh interval of values without a lease (e.g. 2m).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub poll_interval: std::time::Duration,
    /// Azure Instance Metadata Service, where managed identities' tokens come from (only for
    /// bindings that grant a managed identity).
    #[arg(
        long,
        env = "KEYBROKER_AZURE_IMDS",
        default_value = "http://169.254.169.254"
    )]
    pub azure_imds: String,
    /// App Service style identity endpoint; used instead of IMDS when set, with the header
    /// secret from IDENTITY_HEADER.
    #[arg(long, env = "IDENTITY_ENDPOINT")]
    pub azure_identity_endpoint: Option<String>,
}

impl ServeArgs {
    /// What a daemon needs before it starts: its managed identity endpoint and a runtime (or
    /// the exit status, the reason on stderr).
    pub fn start(
        &self,
    ) -> Result<
        (
            keybroker::provider::azure::ManagedEndpoint,
            tokio::runtime::Runtime,
        ),
        std::process::ExitCode,
    > {
        let managed = self.azure_managed().map_err(|e| {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        })?;
        Ok((managed, super::runtime()?))
    }

    fn azure_managed(&self) -> Result<keybroker::provider::azure::ManagedEndpoint, String> {
        use keybroker::provider::azure::ManagedEndpoint;
        Ok(match &self.azure_identity_endpoint {
            Some(endpoint) => {
                let header = std::env::var("IDENTITY_HEADER").map_err(|_| {
                    "IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not: the App Service identity endpoint needs both".to_string()
                })?;
                ManagedEndpoint::AppService {
                    endpoint: endpoint.clone(),
                    header: std::sync::Arc::new(zeroize::Zeroizing::new(header)),
                }
            }
            None => ManagedEndpoint::Imds {
                base: self.azure_imds.clone(),
            },
        })
    }

    pub fn audit(&self) -> AuditLogArgs {
        AuditLogArgs {
            path: self.audit_log.clone(),
            fail_closed: self.audit_fail_closed,
            key: self.audit_key.clone(),
            signing_key: self.audit_signing_key.clone(),
            rotation: keybroker::audit::Rotation {
                max_segment_bytes: self.audit_max_segment_bytes,
                max_segment_age: self.audit_max_segment_age,
                retain_bytes: self.audit_retain.bytes,
                retain_age: self.audit_retain.age,
            },
        }
    }
}

pub struct AuditLogArgs {
    pub path: PathBuf,
    pub fail_closed: bool,
    pub key: Option<PathBuf>,
    pub signing_key: Option<PathBuf>,
    pub rotation: keybroker::audit::Rotation,
}

/// `--audit-retain`: how much sealed log is kept, by size and/or age.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retain {
    pub bytes: Option<u64>,
    pub age: Option<std::time::Duration>,
}

/// A size: a number of bytes, or with a K/M/G (powers of 1000) or KiB/MiB/GiB suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64MiB, 1GiB, 500M)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "M" | "MB" => 1000 * 1000,
        "G" | "GB" => 1000 * 1000 * 1000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use K, M, G, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `1GiB,90d`, `10GiB`, `30d` or `forever`.
pub fn parse_retain(s: &str) -> Result<Retain, String> {
    let mut r = Retain {
        bytes: None,
        age: None,
    };
    if s.trim() == "forever" {
        return Ok(r);
    }
    for part in s.split(',').map(str::trim) {
        let is_age = part
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .chars()
            .next()
            .is_some_and(|c| matches!(c, 'd' | 'h' | 'w' | 'm' | 's'))
            && !part.ends_with('B')
            && !part.ends_with('i');
        if is_age {
            let age = humantime::parse_duration(part)
                .map_err(|e| format!("{part:?} in --audit-retain: {e}"))?;
            if r.age.replace(age).is_some() {
                return Err(format!("--audit-retain {s:?} names two ages"));
            }
        } else {
            let bytes = parse_size(part)?;
            if r.bytes.replace(bytes).is_some() {
                return Err(format!("--audit-retain {s:?} names two sizes"));
            }
        }
    }
    Ok(r)
}

/// Which API a daemon serves its node service on.
/// kubelet's plugin registration, served by keybroker itself.
pub struct Registration {
    /// The registration socket in kubelet's plugins_registry.
    pub socket: PathBuf,
    /// The CSI socket as kubelet sees it.
    pub csi_socket: PathBuf,
}

pub enum Serving {
    Csi {
        endpoint: String,
        registration: Option<Registration>,
        test_controller: bool,
        wait_after_handover: bool,
        /// The external fd keeper also keeps the CSI and registration sockets listening for
        /// the next process (kubelet then never sees the driver go).
        keep_listeners: bool,
    },
    Provider {
        endpoint: String,
    },
}

/// The fd keeper's names for the listening sockets it keeps (`listen:csi`, ...).
const LISTEN_PREFIX: &str = "listen:";

/// The listening socket at `path`: the one the fd keeper kept for this node (its file never
/// changed, so kubelet noticed nothing, and calls made while no keybroker ran waited in its
/// queue) or a new one. With `keep` (an external keeper) the socket is given to the keeper and
/// its file stays when this process ends; otherwise the file is removed then, as before.
/// Returns the listener, the file to remove at the end, and whether it was kept.
async fn listen(
    node: &keybroker::node::NodeService,
    keep: bool,
    kept: &mut std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<(
    tokio::net::UnixListener,
    Option<keybroker_csi::BoundSocket>,
    bool,
)> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(fd) = kept.remove(name) {
        let l = std::os::unix::net::UnixListener::from(fd);
        let same = l
            .local_addr()
            .ok()
            .is_some_and(|a| a.as_pathname() == Some(path))
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        if same {
            l.set_nonblocking(true)?;
            node.keep_listener(name, std::os::fd::OwnedFd::from(l.try_clone()?));
            tracing::info!(socket = %path.display(), "serving on the socket the fd keeper kept");
            return Ok((tokio::net::UnixListener::from_std(l)?, None, true));
        }
        tracing::warn!(socket = %path.display(), "the socket the fd keeper kept is no longer the file at its path; listening anew");
    }
    let (bound, l) = keybroker_csi::bind_socket(&path.display().to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    if keep {
        use std::os::fd::AsFd;
        node.keep_listener(name, l.as_fd().try_clone_to_owned()?);
        return Ok((l, None, false));
    }
    Ok((l, Some(bound), false))
}

/// A server future: CSI or the provider API, until shutdown.
type ServeFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

pub async fn run_node(
    cfg: keybroker::node::NodeConfig,
    serving: Serving,
    audit_args: AuditLogArgs,
    metrics_addr: String,
) -> anyhow::Result<()> {
    use keybroker::node::NodeService;
    // A process still serving this node hands its volumes over first (before this one opens
    // the audit log it writes).
    let (csi, wait_after_handover, keep_listeners) = match &serving {
        Serving::Csi {
            wait_after_handover,
            keep_listeners,
            ..
        } => (true, *wait_after_handover, *keep_listeners),
        Serving::Provider { .. } => (false, false, false),
    };
    let handed = if csi {
        // An error here means a process still serves this node and did not let go: serving
        // beside it would answer its FUSE sessions twice.
        keybroker::node::handover::request(&cfg.state_dir)
            .map_err(|e| anyhow::anyhow!("handover: {e}"))?
    } else {
        None
    };
    let state_dir = cfg.state_dir.clone();
    let keeper = cfg.keeper.clone();
    let forget_idle_after = cfg.forget_idle_after;
    let key = audit_args
        .key
        .as_deref()
        .map(keybroker::audit::AuditKey::load)
        .transpose()?;
    let signing_key = audit_args
        .signing_key
        .as_deref()
        .map(keybroker::audit::SigningKey::load)
        .transpose()?
        .map(std::sync::Arc::new);
    let audit = keybroker::audit::AuditLog::open_with(
        &audit_args.path,
        keybroker::audit::AuditOptions {
            fail_closed: audit_args.fail_closed,
            key,
            rotation: Some(audit_args.rotation),
            signing_key,
        },
    )?;

    // The fd keeper's descriptors (when this process takes them), and the open auditor's
    // fanotify group: handed over by the older process, else kept by the keeper.
    let (mut kept, mut listeners) =
        from_keeper(keeper.as_ref(), handed.is_none() || keep_listeners);
    let mut handed = handed;
    let group_name = keybroker::volume::fanotify::KEPT_NAME;
    // (From the keeper, the previous process died: it may have left opens unanswered. One that
    // handed over stopped listening before it said `done`.)
    let group = match handed.as_mut().and_then(|h| h.remove(group_name)) {
        Some(fd) => Some((fd, false)),
        None => kept.remove(group_name).map(|fd| (fd, true)),
    };
    let node = NodeService::new(cfg, audit.clone(), group)?;
    // Kept for the next process while a binding refuses readers; released otherwise (a group
    // an earlier process left would hold its volumes' opens for nobody).
    node.sync_open_group();
    let shutdown = shutdown_on_signals();
    node.watch_bindings(shutdown.clone())
        .map_err(|e| anyhow::anyhow!("cannot watch the bindings file: {e}"))?;
    let listener = bind_metrics(&metrics_addr, handed.is_some()).await?;
    // The address actually bound (port 0 picks one).
    let metrics_addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(metrics_addr);
    tokio::spawn(keybroker::node::metrics::serve(
        listener,
        node.clone(),
        shutdown.clone(),
    ));
    node.recover(handed.unwrap_or(kept)).await;
    let handovers = if csi {
        let l = keybroker::node::handover::listen(&state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for a handover in {}: {e}",
                state_dir.display()
            )
        })?;
        node.watch_keeper(shutdown.clone());
        Some(l)
    } else {
        None
    };
    let (endpoint, serve): (String, ServeFuture) = match serving {
        Serving::Csi {
            endpoint,
            test_controller,
            registration,
            ..
        } => {
            tracing::info!(endpoint = %endpoint, metrics = %metrics_addr, "serving CSI");
            let serve = serve_csi(
                &node,
                &endpoint,
                registration,
                test_controller,
                keep_listeners,
                &mut listeners,
                &shutdown,
            )
            .await?;
            (endpoint, serve)
        }
        Serving::Provider { endpoint } => {
            tracing::info!(endpoint = %endpoint, metrics = %metrics_addr, "serving the Secrets Store provider API");
            if let Some(idle) = forget_idle_after {
                tokio::spawn(keybroker::node::provider_api::sweep(
                    node.clone(),
                    idle,
                    shutdown.clone(),
                ));
            }
            let (e, node, stop) = (endpoint.clone(), node.clone(), shutdown.clone());
            (
                endpoint,
                Box::pin(async move {
                    keybroker::node::provider_api::serve(node, &e, stop.cancelled_owned()).await
                }),
            )
        }
    };
    let handed_over = serve_until_stopped(&node, serve, handovers, &shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("server on {endpoint}: {e}"))?;
    if !handed_over {
        node.shutdown(false).await;
        // Everything written, signed with --audit-signing-key and anchored; nothing after.
        audit.close();
        tracing::info!("stopped");
        return Ok(());
    }
    // Everything else of this process (metrics, the bindings and keeper watchers) stops.
    shutdown.cancel();
    if wait_after_handover {
        tracing::info!(
            "handed over to the newer process; waiting for SIGTERM (the pod's deletion)"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
    }
    tracing::info!("stopped after handing over");
    Ok(())
}

/// What the serving loop waits for next.
enum Next {
    Served(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    Signal,
    Handover(std::os::fd::OwnedFd),
}

/// Serves until a signal (then in-flight calls get a grace period: kubelet keeps its
/// connection open, so the server is not waited for beyond it) or a committed handover.
/// Returns whether the volumes were handed over.
async fn serve_until_stopped(
    node: &std::sync::Arc<keybroker::node::NodeService>,
    mut serve: ServeFuture,
    mut handovers: Option<keybroker::node::handover::Listener>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    use keybroker::node::handover;
    loop {
        let request = async {
            match handovers.as_mut() {
                Some(l) => l.requests.recv().await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            r = &mut serve => Next::Served(r),
            _ = shutdown.cancelled() => Next::Signal,
            Some(conn) = request => Next::Handover(conn),
        };
        match next {
            Next::Served(r) => return r.map(|()| false),
            Next::Signal => {
                tokio::select! {
                    r = &mut serve => r?,
                    _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!(grace = ?SHUTDOWN_GRACE, "CSI clients still connected after the grace period; stopping anyway"),
                }
                return Ok(false);
            }
            Next::Handover(conn) => {
                let l = handovers
                    .as_ref()
                    .expect("a request came from the listener");
                if handover::hand_over(node, l, conn).await == handover::Outcome::Committed {
                    return Ok(true);
                }
            }
        }
    }
}

/// The metrics and health listener. After a handover the previous process may take a moment
/// to let its port go.
async fn bind_metrics(addr: &str, handed: bool) -> anyhow::Result<tokio::net::TcpListener> {
    let started = std::time::Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && handed
                    && started.elapsed() < std::time::Duration::from_secs(10) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot listen on {addr} for metrics: {e}")),
        }
    }
}

/// Descriptors by keeper name.
type Kept = std::collections::BTreeMap<String, std::os::fd::OwnedFd>;

/// What the fd keeper holds, when `take` (the FUSE sessions were not handed over, or the
/// keeper keeps listening sockets): the sessions, and the listening sockets apart.
fn from_keeper(keeper: Option<&keybroker::keeper::KeeperClient>, take: bool) -> (Kept, Kept) {
    let all = match keeper {
        Some(k) if take => k.take().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot take the FUSE sessions and sockets back from the fd keeper; FUSE volumes are remounted");
            Default::default()
        }),
        _ => Default::default(),
    };
    let (listeners, sessions): (Kept, Kept) = all
        .into_iter()
        .partition(|(n, _)| n.starts_with(LISTEN_PREFIX));
    (sessions, listeners)
}

/// Serves CSI on its socket (kept or new) and, with `registration`, kubelet's registration
/// once the CSI socket accepts calls.
async fn serve_csi(
    node: &std::sync::Arc<keybroker::node::NodeService>,
    endpoint: &str,
    registration: Option<Registration>,
    test_controller: bool,
    keep_listeners: bool,
    listeners: &mut Kept,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<ServeFuture> {
    let csi_path =
        keybroker_csi::socket_path(endpoint).map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    let (csi_listener, csi_bound, _) =
        listen(node, keep_listeners, listeners, "listen:csi", &csi_path).await?;
    if let Some(reg) = registration {
        let (reg_listener, reg_bound, inherited) = listen(
            node,
            keep_listeners,
            listeners,
            "listen:registration",
            &reg.socket,
        )
        .await?;
        if inherited {
            node.registration_continues();
        }
        // kubelet calls the CSI socket as soon as it registers the plugin: register once
        // that socket accepts calls.
        let node = node.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            node.wait_serving().await;
            tracing::info!(socket = %reg.socket.display(), csi = %reg.csi_socket.display(), "serving kubelet's plugin registration");
            if let Err(e) = keybroker_csi::registration::serve_on(
                reg_listener,
                reg_bound,
                &reg.csi_socket,
                node,
                stop.cancelled_owned(),
            )
            .await
            {
                tracing::error!(socket = %reg.socket.display(), error = %e, "cannot serve kubelet's plugin registration: kubelet will not know this driver");
            }
        });
    }
    let (node, stop) = (node.clone(), shutdown.clone());
    Ok(Box::pin(async move {
        keybroker_csi::serve_on(
            csi_listener,
            csi_bound,
            node,
            test_controller,
            stop.cancelled_owned(),
        )
        .await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_retention_parse_as_an_operator_writes_them() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(
            parse_size("12 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        let day = std::time::Duration::from_secs(86400);
        assert_eq!(
            parse_retain("1GiB,90d"),
            Ok(Retain {
                bytes: Some(1 << 30),
                age: Some(90 * day)
            })
        );
        assert_eq!(
            parse_retain("30d"),
            Ok(Retain {
                bytes: None,
                age: Some(30 * day)
            })
        );
        assert_eq!(
            parse_retain("forever"),
            Ok(Retain {
                bytes: None,
                age: None
            })
        );
        assert!(parse_retain("1GiB,2GiB").unwrap_err().contains("two sizes"));
    }
}
