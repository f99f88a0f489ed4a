//! `keybroker node`: the CSI node plugin, its fd keeper client and kubelet registration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;

use super::serve::{Registration, ServeArgs, Serving, run_node};
use super::{KindArg, exit_code, kind, raise_fd_limit};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeeperMode {
    Auto,
    External,
    Off,
}

/// How opens of tmpfs volumes are attributed (`--audit-opens`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpensMode {
    /// Every open waits until keybroker has identified its process (one round trip to the
    /// node, like a FUSE open): every record names the process, however short its life.
    Identify,
    /// Opens never wait; a process that exits before keybroker reads its event is
    /// recorded by pid alone (weaker attribution, named so).
    NotifyBestEffort,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AfterHandover {
    Exit,
    Wait,
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// CSI endpoint, as CSI drivers take it: unix:///csi/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// This node's id (the Kubernetes node name).
    #[arg(long, env = "KUBE_NODE_NAME")]
    pub node_id: String,
    /// Non-secret per-volume records, for taking volumes over after a restart.
    #[arg(long, default_value = "/run/keybroker")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Volume type when a volume does not set volumeType.
    /// tmpfs (the default) survives keybroker restarts and has every open audited through
    /// fanotify; fuse pins one version per open.
    #[arg(long = "default-volume-type", value_enum, default_value_t = KindArg::Tmpfs)]
    pub default_kind: KindArg,
    /// How each open of a tmpfs volume is attributed in the audit log: `identify` holds the
    /// open until its process (pid, uid, command, executable, cgroup, pod, container) is
    /// read from /proc, so even a `cat` that exits at once is named; `notify-best-effort`
    /// never holds an open and records a reader that is already gone by pid alone. With
    /// --audit-fail-closed opens also wait for their record to be written.
    #[arg(long, value_enum, default_value_t = OpensMode::Identify)]
    pub audit_opens: OpensMode,
    /// After NodeUnpublishVolume, how long a FUSE volume that another mount namespace still
    /// holds keeps being served before its connection is aborted.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub fuse_linger: std::time::Duration,
    /// Who keeps the FUSE sessions' descriptors across restarts: `auto` connects to the
    /// keeper at --fd-keeper-socket or starts one (a `keybroker node` run by hand; that
    /// keeper stays while it holds sessions, so the next node takes them over, and exits
    /// with the node once it holds none);
    /// `external` only connects (the chart's keeper DaemonSet, or a systemd unit of its own)
    /// and also gives the keeper the CSI and registration sockets, listening, so the next
    /// process serves on the same files (kubelet never sees the driver go; they stay when
    /// keybroker stops); `off` keeps none, and a restart breaks every FUSE volume's running
    /// containers (ENOTCONN).
    #[arg(long, value_enum, default_value_t = KeeperMode::Auto)]
    pub fd_keeper: KeeperMode,
    /// The fd keeper's socket (default: keeper.sock in --state-dir).
    #[arg(long)]
    pub fd_keeper_socket: Option<PathBuf>,
    /// What this process does once it has handed its volumes over to a newer one (an
    /// upgrade): `exit`, or `wait` for SIGTERM (in a pod, where an exit would be
    /// restarted by kubelet; the DaemonSet deletes the old pod once the new one is ready).
    #[arg(long, value_enum, default_value_t = AfterHandover::Exit)]
    pub after_handover: AfterHandover,
    /// kubelet's plugin registration directory (`<kubelet root>/plugins_registry`): keybroker
    /// serves kubelet's registration API on `csi.keybroker.io-reg.sock` there, so no
    /// node-driver-registrar sidecar is needed. kubelet's verdict is logged, and a refusal
    /// turns /readyz to 503 with its reason. Unset: no registration (a registrar does it).
    #[arg(long, value_name = "DIR")]
    pub kubelet_registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it, told to kubelet at registration
    /// (default: the --endpoint path, right when keybroker mounts kubelet's directory at
    /// the same path).
    #[arg(long, value_name = "PATH")]
    pub kubelet_csi_socket: Option<PathBuf>,
    /// kubelet's pod log directory (one `<namespace>_<name>_<uid>` directory per pod): a
    /// refused opener's pod is named from it in the audit log (only directory names are
    /// read, never a log). Missing or unreadable: refused openers are named by pod uid alone.
    #[arg(long, value_name = "DIR", default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,
    /// TEST ONLY: serve a fake CSI Controller so csi-sanity can drive the node service.
    /// Exists only in builds with the `test-controller` feature.
    #[arg(long, hide = true)]
    pub danger_test_controller: bool,
}

/// `keybroker node`: the CSI node plugin.
pub fn run(args: NodeArgs) -> ExitCode {
    let NodeArgs {
        endpoint,
        node_id,
        state_dir,
        serve,
        default_kind,
        audit_opens,
        fuse_linger,
        fd_keeper,
        fd_keeper_socket,
        after_handover,
        kubelet_registration_dir,
        kubelet_csi_socket,
        pod_log_dir,
        danger_test_controller,
    } = args;
    keybroker::procinfo::set_pod_log_dir(pod_log_dir);
    let (azure_managed, rt) = match serve.start() {
        Ok(started) => started,
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
        audit_opens: Some(match audit_opens {
            OpensMode::Identify => keybroker::volume::fanotify::Mode::Identify,
            OpensMode::NotifyBestEffort => keybroker::volume::fanotify::Mode::Notify,
        }),
        release_memory: Some(super::malloc::trim_heap),
        keeper: None,
        forget_idle_after: None,
    };
    raise_fd_limit();
    let keeper_socket = fd_keeper_socket.unwrap_or_else(|| cfg.state_dir.join("keeper.sock"));
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
