//! The `keybroker` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use keybroker::mount::MountOverrides;
use keybroker::volume::VolumeKind;

#[derive(Parser)]
#[command(
    name = "keybroker",
    version,
    about = "Serves secrets to pods and programs from memory, as their own identity."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KEYBROKER_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing syntax, e.g. `info` or `keybroker=debug`).
    #[arg(long, global = true, default_value = "info", env = "KEYBROKER_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Fuse,
    Tmpfs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KeeperMode {
    Auto,
    External,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AfterHandover {
    Exit,
    Wait,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a secrets volume on DIR and keep it fresh until interrupted (Ctrl-C / SIGTERM).
    ///
    /// Every object listed in the config is fetched and rendered before anything is mounted.
    /// A mount left at DIR by a keybroker that was killed is found and cleaned first.
    Mount {
        /// The volume config (YAML); see examples/quickstart.yaml.
        #[arg(long, short)]
        config: PathBuf,
        /// Serve with FUSE (default, from memory) or write files on a tmpfs (needs root).
        #[arg(long = "type", value_enum)]
        kind: Option<KindArg>,
        /// Write the audit log here instead of the config's audit.path.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// Key the audit chain with HMAC-SHA256 (a file of 64 hex digits or >= 32 bytes):
        /// forging, truncating or re-chaining the log then needs the key.
        #[arg(long, env = "KEYBROKER_AUDIT_KEY_FILE")]
        audit_key: Option<PathBuf>,
        /// Where to mount; created when missing.
        dir: PathBuf,
    },
    /// Write a pod's secret files once, as the pod, then exit (an init container).
    ///
    /// Same config as `mount` (provider local, vault with the pod's token file, or azure with
    /// the workload identity environment). Exits non-zero naming the object when a file cannot
    /// be written. Needs no privileges.
    Init {
        #[arg(long, short)]
        config: PathBuf,
        /// Where the files go (a shared emptyDir, medium: Memory); kubelet's atomic layout.
        #[arg(long)]
        dir: PathBuf,
        /// The audit log (overrides the config's audit.path); `-` writes the records to
        /// standard output as JSON lines (logs go to standard error).
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
    /// Keep a pod's secret files fresh, as the pod (a native sidecar container).
    ///
    /// Writes once, turns ready (/readyz on --health-addr, or `keybroker probe`), then
    /// refreshes with the same cache, rotation and backoff rules as the node, and runs the
    /// config's onChange actions after each write that changed files. Needs no privileges.
    Sidecar {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        /// /healthz and /readyz (200 only after the first complete write).
        #[arg(long, default_value = "127.0.0.1:8099")]
        health_addr: String,
        /// The audit log (overrides the config's audit.path); `-` for standard output.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// Serve the broker API (Get/List/Watch) on this unix socket, e.g. in the shared
        /// emptyDir.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// A caller uid the broker API serves (repeatable; default: the sidecar's own uid).
        /// Callers are identified by the kernel (SO_PEERCRED); others are refused and audited.
        #[arg(long)]
        api_uid: Vec<u32>,
    },
    /// Exit 0 when DIR holds a complete write (a startup or readiness probe command).
    ///
    /// A complete write is what `keybroker init` or `sidecar` makes once every file of the
    /// config was fetched and rendered: the files in a `..<timestamp>` directory and the
    /// `..data` link to it (kubelet's atomic-writer layout). Until then, including on an empty
    /// or missing directory, it exits 1 and says so on stderr.
    Probe {
        /// The directory `keybroker init` or `sidecar` writes (its --dir).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run the CSI node plugin: serve pod volumes on a node (DaemonSet mode).
    ///
    /// kubelet calls NodePublishVolume/NodeUnpublishVolume on the unix socket; each volume is
    /// authorized against the bindings file (default deny), filled from the bound identity's
    /// provider through a node-wide cache, kept fresh and audited.
    Node {
        /// CSI endpoint, as CSI drivers take it: unix:///csi/csi.sock
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: String,
        /// This node's id (the Kubernetes node name).
        #[arg(long, env = "KUBE_NODE_NAME")]
        node_id: String,
        /// Non-secret per-volume records, for taking volumes over after a restart.
        #[arg(long, default_value = "/run/keybroker")]
        state_dir: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
        /// Volume type when a volume does not set volumeType.
        /// tmpfs (the default) survives keybroker restarts and has every open audited through
        /// fanotify; fuse pins one version per open.
        #[arg(long = "default-volume-type", value_enum, default_value_t = KindArg::Tmpfs)]
        default_kind: KindArg,
        /// After NodeUnpublishVolume, how long a FUSE volume that another mount namespace still
        /// holds keeps being served before its connection is aborted.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        fuse_linger: std::time::Duration,
        /// Who keeps the FUSE sessions' descriptors across restarts: `auto` connects to the
        /// keeper at --fd-keeper-socket or starts one (a `keybroker node` run by hand; that
        /// keeper stays while it holds sessions, so the next node takes them over, and exits
        /// with the node once it holds none);
        /// `external` only connects (the DaemonSet's keeper container); `off` keeps none, and
        /// a restart breaks every FUSE volume's running containers (ENOTCONN).
        #[arg(long, value_enum, default_value_t = KeeperMode::Auto)]
        fd_keeper: KeeperMode,
        /// The fd keeper's socket (default: keeper.sock in --state-dir).
        #[arg(long)]
        fd_keeper_socket: Option<PathBuf>,
        /// What this process does once it has handed its volumes over to a newer one (an
        /// upgrade): `exit`, or `wait` for SIGTERM (in a pod, where an exit would be
        /// restarted by kubelet; the DaemonSet deletes the old pod once the new one is ready).
        #[arg(long, value_enum, default_value_t = AfterHandover::Exit)]
        after_handover: AfterHandover,
        /// kubelet's plugin registration directory (`<kubelet root>/plugins_registry`): keybroker
        /// serves kubelet's registration API on `csi.keybroker.io-reg.sock` there, so no
        /// node-driver-registrar sidecar is needed. kubelet's verdict is logged, and a refusal
        /// turns /readyz to 503 with its reason. Unset: no registration (a registrar does it).
        #[arg(long, value_name = "DIR")]
        kubelet_registration_dir: Option<PathBuf>,
        /// The CSI socket's path as kubelet sees it, told to kubelet at registration
        /// (default: the --endpoint path, right when keybroker mounts kubelet's directory at
        /// the same path).
        #[arg(long, value_name = "PATH")]
        kubelet_csi_socket: Option<PathBuf>,
        /// TEST ONLY: serve a fake CSI Controller so csi-sanity can drive the node service.
        /// Exists only in builds with the `test-controller` feature.
        #[arg(long, hide = true)]
        danger_test_controller: bool,
    },
    /// Hold the node's FUSE session descriptors so FUSE volumes outlive a crash or restart of
    /// `keybroker node` (the DaemonSet runs it as its own container; a node started by hand
    /// starts one itself).
    ///
    /// It only keeps descriptors and hands them back (SCM_RIGHTS on a unix socket only its own
    /// uid may use); it reads no FUSE request and holds no secret.
    FdKeeper {
        /// The unix socket the node talks to (`keybroker node --fd-keeper-socket`, by default
        /// `<state-dir>/keeper.sock`). Created 0600; only this process's uid may connect. A
        /// second keeper on a socket that answers refuses to start.
        #[arg(long, default_value = "/run/keybroker/keeper.sock")]
        socket: PathBuf,
        /// Exit once it has held nothing and heard from nobody for this long: a duration such
        /// as `60s`, `5m` or `1h 30m`. Without it the keeper runs until asked to quit (the
        /// DaemonSet's keeper container).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        exit_when_idle: Option<std::time::Duration>,
        /// Exit as soon as its node has exited and nothing is held (what `keybroker node
        /// --fd-keeper auto` asks of the keeper it starts). Its node is the process that
        /// started it, or the `keybroker node` that last checked on it. While it holds FUSE
        /// sessions it stays, which is what it is for.
        #[arg(long)]
        exit_with_node: bool,
    },
    /// Serve the Secrets Store CSI driver's provider API (behind an existing driver).
    ///
    /// The driver calls Mount on the unix socket for each pod and at each rotation poll; each
    /// call is authorized against the bindings (default deny), answered from the node-wide
    /// cache and audited, and the driver writes the files. Pods keep their
    /// SecretProviderClasses (Azure and Vault parameter names).
    Provider {
        /// The socket in the driver's providers directory (its --provider-volume).
        #[arg(
            long,
            env = "KEYBROKER_PROVIDER_ENDPOINT",
            default_value = "unix:///etc/kubernetes/secrets-store-csi-providers/keybroker.sock"
        )]
        endpoint: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Validate a bindings file offline, and explain a decision.
    ///
    /// With only --bindings: checks the file and lists what it grants. With --namespace,
    /// --service-account, --provider and one or more --object: says whether such a pod may
    /// read those objects, and which binding allows it or why each one does not.
    Check {
        #[arg(long)]
        bindings: PathBuf,
        #[arg(long, requires_all = ["service_account", "provider"])]
        namespace: Option<String>,
        #[arg(long)]
        service_account: Option<String>,
        #[arg(long, value_parser = ["local", "azure", "vault"])]
        provider: Option<String>,
        #[arg(long)]
        object: Vec<String>,
        /// The volume's clientID (Azure).
        #[arg(long)]
        client_id: Option<String>,
        /// The volume's tenantID (Azure).
        #[arg(long)]
        tenant_id: Option<String>,
        /// The volume's keyvaultName (Azure).
        #[arg(long)]
        keyvault: Option<String>,
        /// The volume asks for the node's managed identity (useVMManagedIdentity).
        #[arg(long)]
        managed_identity: bool,
        /// The volume's roleName (Vault).
        #[arg(long)]
        role: Option<String>,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's chain and head anchor; exit 1 naming the first broken line.
    ///
    /// Without --key, anyone who can rewrite the whole log and its anchor can forge a
    /// consistent one; with the key the log was written with, that needs the key.
    ///
    /// On a log that is being written, the anchor trails the last record by up to 200 ms: a
    /// keyed log still verifies (the records after the anchor carry MACs), an unkeyed one
    /// reports them as records after the anchor, and a record being written at that moment
    /// shows as a cut-off last line. Verify a log whose writer has stopped (or a copy of the
    /// log taken after its anchor), or key the log.
    Verify {
        /// The audit log (JSON lines); its `.head` anchor next to it is checked too.
        file: PathBuf,
        /// The chain key (the daemon's --audit-key file); required for a keyed log.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Accept a log whose `.head` anchor is missing (records cut off the end then go
        /// undetected).
        #[arg(long)]
        allow_missing_head: bool,
    },
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    token
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(2)
        })
}

/// Exit status of a long-running command: 0, or 1 with the error on stderr and in the log.
fn exit_code(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn kind(k: KindArg) -> VolumeKind {
    match k {
        KindArg::Fuse => VolumeKind::Fuse,
        KindArg::Tmpfs => VolumeKind::Tmpfs,
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    bindings: PathBuf,
    namespace: Option<String>,
    service_account: Option<String>,
    provider: Option<String>,
    object: Vec<String>,
    ask: keybroker::node::request::IdentityRequest,
) -> ExitCode {
    use keybroker::node::bindings::Bindings;
    use keybroker::node::request::{PodInfo, ProviderKind};
    let b = match Bindings::load(&bindings) {
        Ok(b) => b,
        Err(e) => {
            println!("invalid: {e}");
            return ExitCode::from(1);
        }
    };
    let (Some(ns), Some(sa), Some(p)) = (namespace, service_account, provider) else {
        println!("ok: {} bindings", b.list.len());
        for x in &b.list {
            let sas: Vec<&str> = x.service_accounts.iter().map(String::as_str).collect();
            let objects: Vec<String> = x.objects.iter().map(ToString::to_string).collect();
            println!(
                "  {}: {}/{{{}}} -> {} objects [{}]",
                x.name,
                x.namespace,
                sas.join(","),
                x.identity.key(),
                objects.join(", ")
            );
        }
        return ExitCode::SUCCESS;
    };
    let provider = match p.as_str() {
        "azure" => ProviderKind::Azure,
        "vault" => ProviderKind::Vault,
        _ => ProviderKind::Local,
    };
    let pod = PodInfo {
        namespace: ns,
        name: "<any>".into(),
        uid: String::new(),
        service_account: sa,
    };
    match b.decide(&pod, provider, &ask, &object) {
        Ok(g) => {
            println!(
                "allowed: binding {:?} grants {} as {}",
                g.binding,
                object.join(", "),
                g.identity.key()
            );
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("{why}");
            ExitCode::from(1)
        }
    }
}

/// Stops glibc from raising its mmap threshold as large blocks are freed.
///
/// fuser gives every FUSE session thread a 16 MiB zeroed read buffer. Fresh mmap'd memory is
/// zero for free and only the pages the kernel writes become resident. But once such a block is
/// freed, glibc's dynamic threshold lets the next 16 MiB calloc come from the heap, where it is
/// memset and fully resident. Measured: 101 volumes took 242 MiB RSS with the dynamic
/// threshold and 16 MiB with a fixed 128 KiB threshold (BENCHMARKS.md). Setting the threshold
/// explicitly turns the dynamic adjustment off.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning parameters; it is called once, before any
    // other thread exists, with a constant that glibc documents as valid for M_MMAP_THRESHOLD.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    if ok != 1 {
        eprintln!(
            "warning: mallopt(M_MMAP_THRESHOLD) failed; memory use with many FUSE volumes will be higher"
        );
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

/// Returns the free memory of glibc's heaps to the kernel (after volumes were unpublished: the
/// freed pages would otherwise stay resident at the high-water mark).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only releases memory glibc already considers free; it takes the
    // allocator's own locks and may be called from any thread at any time.
    let _ = unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// glibc gives each thread that allocates its own arena (up to 8 per core), each with its own
/// resident heap pages; in the pod one arena serves the few threads there are.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn in_pod_malloc() {
    // SAFETY: as in fix_malloc_mmap_threshold: a tuning parameter, set once before any other
    // thread exists, to a value glibc documents as valid for M_ARENA_MAX.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn in_pod_malloc() {}

fn main() -> ExitCode {
    fix_malloc_mmap_threshold();
    // Before anything reads a secret: no core dumps, in every mode.
    let hardening = keybroker::hardening::disable_core_dumps();
    // rustls's crypto provider (ring) for every HTTPS client of the process.
    keybroker::tls::init();
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    // Every request keybroker sends names it and its mode (User-Agent).
    keybroker::tls::set_mode(match &cli.command {
        Command::Node { .. } => "node",
        Command::Provider { .. } => "provider",
        Command::Init { .. } => "init",
        Command::Sidecar { .. } => "sidecar",
        Command::Mount { .. } => "mount",
        _ => "cli",
    });
    for w in &hardening.warnings {
        tracing::warn!("{w}");
    }
    match cli.command {
        Command::Check {
            bindings,
            namespace,
            service_account,
            provider,
            object,
            client_id,
            tenant_id,
            keyvault,
            managed_identity,
            role,
        } => {
            let ask = keybroker::node::request::IdentityRequest {
                client_id: if managed_identity {
                    None
                } else {
                    client_id.clone()
                },
                user_assigned_identity_id: if managed_identity { client_id } else { None },
                tenant_id,
                keyvault_name: keyvault,
                use_vm_managed_identity: managed_identity,
                role_name: role,
                ..Default::default()
            };
            check(bindings, namespace, service_account, provider, object, ask)
        }
        Command::Node {
            endpoint,
            node_id,
            state_dir,
            serve,
            default_kind,
            fuse_linger,
            fd_keeper,
            fd_keeper_socket,
            after_handover,
            kubelet_registration_dir,
            kubelet_csi_socket,
            danger_test_controller,
        } => {
            let azure_managed = match serve.azure_managed() {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let cfg = keybroker::node::NodeConfig {
                node_id,
                state_dir,
                bindings_path: serve.bindings.clone(),
                default_kind: kind(default_kind),
                poll: serve.poll_interval,
                limits: Default::default(),
                fuse_linger,
                azure_managed,
                audit_opens: true,
                release_memory: Some(trim_heap),
                keeper: None,
            };
            raise_fd_limit();
            let keeper_socket =
                fd_keeper_socket.unwrap_or_else(|| cfg.state_dir.join("keeper.sock"));
            let cfg = keybroker::node::NodeConfig {
                keeper: keeper(fd_keeper, &keeper_socket),
                ..cfg
            };
            let res = rt.block_on(run_node(
                cfg,
                Serving::Csi {
                    registration: kubelet_registration_dir.map(|dir| Registration {
                        socket: keybroker_csi::registration::socket_in(&dir),
                        csi_socket: kubelet_csi_socket.unwrap_or_else(|| {
                            PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(&endpoint))
                        }),
                    }),
                    endpoint,
                    test_controller: danger_test_controller,
                    wait_after_handover: after_handover == AfterHandover::Wait,
                    keep_listeners: fd_keeper == KeeperMode::External,
                },
                serve.audit(),
                serve.metrics_addr,
            ));
            exit_code(res)
        }
        Command::FdKeeper {
            socket,
            exit_when_idle,
            exit_with_node,
        } => {
            raise_fd_limit();
            let opts = keybroker::keeper::KeeperOptions {
                socket,
                exit_when_idle,
                exit_with_node,
            };
            match keybroker::keeper::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(socket = %opts.socket.display(), error = %e, "fd keeper stopped");
                    eprintln!("error: fd keeper at {}: {e}", opts.socket.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::Provider { endpoint, serve } => {
            let azure_managed = match serve.azure_managed() {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            // No volumes of its own: the state directory only ever stays empty.
            let state_dir =
                std::env::temp_dir().join(format!("keybroker-provider-{}", std::process::id()));
            let cfg = keybroker::node::NodeConfig {
                node_id: "secrets-store-provider".into(),
                state_dir: state_dir.clone(),
                bindings_path: serve.bindings.clone(),
                default_kind: keybroker::volume::VolumeKind::Tmpfs,
                poll: serve.poll_interval,
                limits: Default::default(),
                fuse_linger: std::time::Duration::ZERO,
                azure_managed,
                // The driver writes and serves the files: nothing of keybroker's to watch.
                audit_opens: false,
                release_memory: None,
                keeper: None,
            };
            let res = rt.block_on(run_node(
                cfg,
                Serving::Provider { endpoint },
                serve.audit(),
                serve.metrics_addr,
            ));
            let _ = std::fs::remove_dir_all(&state_dir);
            exit_code(res)
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    key,
                    allow_missing_head,
                },
        } => {
            let key = match key
                .map(|k| keybroker::audit::AuditKey::load(&k))
                .transpose()
            {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let keyed = key.is_some();
            let opts = keybroker::audit::VerifyOptions {
                key,
                allow_missing_head,
            };
            verify_command(&file, &opts, keyed)
        }
        Command::Init {
            config,
            dir,
            audit_log,
        } => in_pod(keybroker::sidecar::Options {
            config,
            dir,
            once: true,
            health_addr: None,
            audit_path: audit_log,
            api_socket: None,
            api_uids: Vec::new(),
        }),
        Command::Sidecar {
            config,
            dir,
            health_addr,
            audit_log,
            api_socket,
            api_uid,
        } => in_pod(keybroker::sidecar::Options {
            config,
            dir,
            once: false,
            health_addr: Some(health_addr),
            audit_path: audit_log,
            api_socket,
            api_uids: api_uid,
        }),
        Command::Probe { dir } => {
            if keybroker::sidecar::probe(&dir) {
                ExitCode::SUCCESS
            } else {
                eprintln!("{}: no complete write yet", dir.display());
                ExitCode::from(1)
            }
        }
        Command::Mount {
            config,
            kind,
            audit_log,
            audit_key,
            dir,
        } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            let overrides = MountOverrides {
                kind: kind.map(|k| match k {
                    KindArg::Fuse => VolumeKind::Fuse,
                    KindArg::Tmpfs => VolumeKind::Tmpfs,
                }),
                audit_path: audit_log,
                audit_key,
            };
            let res = rt.block_on(async {
                let shutdown = shutdown_on_signals();
                keybroker::mount::run(&config, &dir, overrides, shutdown).await
            });
            exit_code(res)
        }
    }
}

/// `init` and `sidecar`: the pod-side runs. One pod's files need no parallelism: a
/// single-threaded runtime (blocking work still goes to tokio's blocking pool), and one malloc
/// arena (`in_pod_malloc`), keep the container small (BENCHMARKS.md, sidecar memory).
fn in_pod(opts: keybroker::sidecar::Options) -> ExitCode {
    in_pod_malloc();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(async {
        let shutdown = shutdown_on_signals();
        keybroker::sidecar::run(opts, shutdown).await
    });
    exit_code(res)
}

/// How long in-flight CSI calls may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What `node` and `provider` share: bindings, audit, metrics, polling, Azure endpoints.
#[derive(clap::Args)]
struct ServeArgs {
    /// Identity bindings (YAML), reloaded when it changes; see `keybroker check --help`.
    #[arg(long, default_value = "/etc/keybroker/bindings.yaml")]
    bindings: PathBuf,
    /// The audit log (JSON lines, hash-chained).
    #[arg(long, default_value = "/var/log/keybroker/audit.jsonl")]
    audit_log: PathBuf,
    /// Key the audit chain with HMAC-SHA256 (a file of 64 hex digits or >= 32 bytes):
    /// forging, truncating or re-chaining the log then needs the key.
    #[arg(long, env = "KEYBROKER_AUDIT_KEY_FILE")]
    audit_key: Option<PathBuf>,
    /// While the audit log cannot be written: refuse FUSE opens (EIO) and new publishes or
    /// Mounts (Unavailable). Serving resumes once a write succeeds again. tmpfs volumes are
    /// not audited per open, so this does not cover their reads (docs/SECURITY.md).
    #[arg(long)]
    audit_fail_closed: bool,
    /// Prometheus metrics and health endpoints (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9808")]
    metrics_addr: String,
    /// Refresh interval of values without a lease (e.g. 2m).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    poll_interval: std::time::Duration,
    /// Azure Instance Metadata Service, where managed identities' tokens come from (only for
    /// bindings that grant a managed identity).
    #[arg(
        long,
        env = "KEYBROKER_AZURE_IMDS",
        default_value = "http://169.254.169.254"
    )]
    azure_imds: String,
    /// App Service style identity endpoint; used instead of IMDS when set, with the header
    /// secret from IDENTITY_HEADER.
    #[arg(long, env = "IDENTITY_ENDPOINT")]
    azure_identity_endpoint: Option<String>,
}

impl ServeArgs {
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

    fn audit(&self) -> AuditArgs {
        AuditArgs {
            path: self.audit_log.clone(),
            fail_closed: self.audit_fail_closed,
            key: self.audit_key.clone(),
        }
    }
}

struct AuditArgs {
    path: PathBuf,
    fail_closed: bool,
    key: Option<PathBuf>,
}

fn verify_command(
    file: &std::path::Path,
    opts: &keybroker::audit::VerifyOptions,
    keyed: bool,
) -> ExitCode {
    match keybroker::audit::verify(file, opts) {
        Ok(Ok(report)) => {
            let chain = if keyed {
                "HMAC chain intact"
            } else {
                "chain intact"
            };
            let head = if !report.anchored {
                " (no head anchor: records cut off the end would go unnoticed)".to_string()
            } else if report.beyond_head > 0 {
                format!(
                    ", head anchor matches; {} records after it (MAC-protected)",
                    report.beyond_head
                )
            } else {
                ", head anchor matches".to_string()
            };
            println!("ok: {} records, {chain}{head}", report.records);
            ExitCode::SUCCESS
        }
        Ok(Err(brk)) => {
            println!("broken: {brk}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Raises the soft limit of open descriptors to the hard one: the node holds two per FUSE
/// volume (the session and the duplicate it hands over), the keeper one per volume.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit");
    }
}

/// The fd keeper the node gives its FUSE sessions to (see `keybroker fd-keeper`).
fn keeper(mode: KeeperMode, socket: &std::path::Path) -> Option<keybroker::keeper::KeeperClient> {
    use std::time::{Duration, Instant};
    let client = keybroker::keeper::KeeperClient::new(socket);
    let answers_within = |wait: Duration| {
        let started = Instant::now();
        loop {
            if client.ping().is_ok() {
                return true;
            }
            if started.elapsed() >= wait {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    match mode {
        KeeperMode::Off => {
            tracing::warn!(
                "--fd-keeper off: FUSE volumes end with this process (a restart breaks their running containers)"
            );
            None
        }
        KeeperMode::External => {
            if !answers_within(Duration::from_secs(10)) {
                tracing::error!(socket = %socket.display(), "the fd keeper does not answer yet; FUSE sessions are given to it once it does, and do not survive a crash before");
            }
            Some(client)
        }
        KeeperMode::Auto => {
            if client.ping().is_ok() {
                return Some(client);
            }
            // Its own process group: a signal to the node's group (Ctrl-C, a test harness)
            // leaves it running, which is its whole point.
            use std::os::unix::process::CommandExt;
            let started = std::env::current_exe().and_then(|exe| {
                std::process::Command::new(exe)
                    .arg("fd-keeper")
                    .arg("--socket")
                    .arg(socket)
                    .args(["--exit-when-idle", "60s", "--exit-with-node"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .process_group(0)
                    .spawn()
            });
            match started {
                Ok(mut child) => {
                    let pid = child.id();
                    // Reaped when it exits (it is this process's child until this one exits).
                    let _ = std::thread::Builder::new()
                        .name("kb-keeper-wait".into())
                        .stack_size(64 * 1024)
                        .spawn(move || {
                            let _ = child.wait();
                        });
                    if answers_within(Duration::from_secs(5)) {
                        tracing::info!(socket = %socket.display(), pid, "started an fd keeper");
                    } else {
                        tracing::error!(socket = %socket.display(), pid, "the fd keeper started but does not answer; FUSE volumes will not survive a restart until it does");
                    }
                    Some(client)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start an fd keeper; FUSE volumes will not survive a restart");
                    None
                }
            }
        }
    }
}

/// Which API a daemon serves its node service on.
/// kubelet's plugin registration, served by keybroker itself.
struct Registration {
    /// The registration socket in kubelet's plugins_registry.
    socket: PathBuf,
    /// The CSI socket as kubelet sees it.
    csi_socket: PathBuf,
}

enum Serving {
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

async fn run_node(
    cfg: keybroker::node::NodeConfig,
    serving: Serving,
    audit_args: AuditArgs,
    metrics_addr: String,
) -> anyhow::Result<()> {
    use keybroker::node::NodeService;
    // A process still serving this node hands its volumes over first (before this one opens
    // the audit log it writes).
    let csi = matches!(serving, Serving::Csi { .. });
    let wait_after_handover = matches!(
        serving,
        Serving::Csi {
            wait_after_handover: true,
            ..
        }
    );
    let handed = if csi {
        keybroker::node::handover::request(&cfg.state_dir).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the handover from the running keybroker failed; taking the sessions from the fd keeper");
            None
        })
    } else {
        None
    };
    let state_dir = cfg.state_dir.clone();
    let keeper = cfg.keeper.clone();
    let key = audit_args
        .key
        .as_deref()
        .map(keybroker::audit::AuditKey::load)
        .transpose()?;
    let audit =
        keybroker::audit::AuditLog::open_keyed(&audit_args.path, audit_args.fail_closed, key)?;

    let node = NodeService::new(cfg, audit.clone())?;
    let shutdown = shutdown_on_signals();
    node.watch_bindings(shutdown.clone())
        .map_err(|e| anyhow::anyhow!("cannot watch the bindings file: {e}"))?;
    // After a handover the previous process may take a moment to let its port go.
    let listener = {
        let started = std::time::Instant::now();
        loop {
            match tokio::net::TcpListener::bind(&metrics_addr).await {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && handed.is_some()
                        && started.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "cannot listen on {metrics_addr} for metrics: {e}"
                    ));
                }
            }
        }
    };
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
    let keep_listeners = matches!(
        serving,
        Serving::Csi {
            keep_listeners: true,
            ..
        }
    );
    // What the fd keeper holds: the FUSE sessions (unless they were handed over) and the
    // listening sockets it keeps.
    let mut kept = match &keeper {
        Some(k) if handed.is_none() || keep_listeners => k.take().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot take the FUSE sessions and sockets back from the fd keeper; FUSE volumes are remounted");
            Default::default()
        }),
        _ => Default::default(),
    };
    let mut listeners = std::collections::BTreeMap::new();
    let names: Vec<String> = kept
        .keys()
        .filter(|n| n.starts_with(LISTEN_PREFIX))
        .cloned()
        .collect();
    for n in names {
        if let Some(fd) = kept.remove(&n) {
            listeners.insert(n, fd);
        }
    }
    let sessions = handed.unwrap_or(kept);
    node.recover(sessions).await;
    if csi {
        keybroker::node::handover::listen(node.clone(), &state_dir, shutdown.clone()).map_err(
            |e| {
                anyhow::anyhow!(
                    "cannot listen for a handover in {}: {e}",
                    state_dir.display()
                )
            },
        )?;
        node.watch_keeper(shutdown.clone());
    }
    let stop = shutdown.clone();
    let stopped = async move { stop.cancelled().await };
    let (endpoint, serve): (
        String,
        std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
    ) = match serving {
        Serving::Csi {
            endpoint,
            test_controller,
            registration,
            ..
        } => {
            tracing::info!(endpoint = %endpoint, metrics = %metrics_addr, "serving CSI");
            let csi_path = keybroker_csi::socket_path(&endpoint)
                .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
            let (csi_listener, csi_bound, _) = listen(
                &node,
                keep_listeners,
                &mut listeners,
                "listen:csi",
                &csi_path,
            )
            .await?;
            if let Some(reg) = registration {
                let (reg_listener, reg_bound, inherited) = listen(
                    &node,
                    keep_listeners,
                    &mut listeners,
                    "listen:registration",
                    &reg.socket,
                )
                .await?;
                if inherited {
                    node.registration_continues();
                }
                // kubelet calls the CSI socket as soon as it registers the plugin: register
                // once that socket accepts calls.
                let node = node.clone();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    node.wait_serving().await;
                    tracing::info!(socket = %reg.socket.display(), csi = %reg.csi_socket.display(), "serving kubelet's plugin registration");
                    let stopped = async move { stop.cancelled().await };
                    if let Err(e) = keybroker_csi::registration::serve_on(
                        reg_listener,
                        reg_bound,
                        &reg.csi_socket,
                        node,
                        stopped,
                    )
                    .await
                    {
                        tracing::error!(socket = %reg.socket.display(), error = %e, "cannot serve kubelet's plugin registration: kubelet will not know this driver");
                    }
                });
            }
            let node = node.clone();
            (
                endpoint,
                Box::pin(async move {
                    keybroker_csi::serve_on(csi_listener, csi_bound, node, test_controller, stopped)
                        .await
                }),
            )
        }
        Serving::Provider { endpoint } => {
            tracing::info!(endpoint = %endpoint, metrics = %metrics_addr, "serving the Secrets Store provider API");
            let e = endpoint.clone();
            let node = node.clone();
            (
                endpoint,
                Box::pin(
                    async move { keybroker::node::provider_api::serve(node, &e, stopped).await },
                ),
            )
        }
    };
    // kubelet keeps its connection open: after a signal, in-flight calls get a grace period,
    // then the process stops regardless instead of waiting for clients to hang up.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = serve => r.map_err(|e| anyhow::anyhow!("server on {endpoint}: {e}"))?,
        _ = grace => tracing::warn!(grace = ?SHUTDOWN_GRACE, "CSI clients still connected after the grace period; stopping anyway"),
    }
    node.shutdown().await;
    audit.flush();
    if node.complete_handover() {
        if wait_after_handover {
            tracing::info!(
                "handed over to the newer process; waiting for SIGTERM (the pod's deletion)"
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            term.recv().await;
        }
        tracing::info!("stopped after handing over");
    } else {
        tracing::info!("stopped");
    }
    Ok(())
}
