//! The `keybroker` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::{LogFormat, audit, check, keeper, mount, node, pod, provider};

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

#[derive(Subcommand)]
enum Command {
    /// Mount a secrets volume on DIR and keep it fresh until interrupted (Ctrl-C / SIGTERM).
    ///
    /// Every object listed in the config is fetched and rendered before anything is mounted.
    /// A mount left at DIR by a keybroker that was killed is found and cleaned first.
    Mount(mount::MountArgs),
    /// Write a pod's secret files once, as the pod, then exit (an init container).
    ///
    /// Same config as `mount` (provider local, vault with the pod's token file, or azure with
    /// the workload identity environment). Exits non-zero naming the object when a file cannot
    /// be written. Needs no privileges.
    Init(pod::InitArgs),
    /// Keep a pod's secret files fresh, as the pod (a native sidecar container).
    ///
    /// Writes once, turns ready (/readyz on --health-addr, or `keybroker probe`), then
    /// refreshes with the same cache, rotation and backoff rules as the node, and runs the
    /// config's onChange actions after each write that changed files. Needs no privileges.
    Sidecar(pod::SidecarArgs),
    /// Exit 0 when DIR holds a complete write (a startup or readiness probe command).
    ///
    /// A complete write is what `keybroker init` or `sidecar` makes once every file of the
    /// config was fetched and rendered: the files in a `..<timestamp>` directory and the
    /// `..data` link to it (kubelet's atomic-writer layout). Until then, including on an empty
    /// or missing directory, it exits 1 and says so on stderr.
    Probe(pod::ProbeArgs),
    /// Run the CSI node plugin: serve pod volumes on a node (DaemonSet mode).
    ///
    /// kubelet calls NodePublishVolume/NodeUnpublishVolume on the unix socket; each volume is
    /// authorized against the bindings file (default deny), filled from the bound identity's
    /// provider through a node-wide cache, kept fresh and audited.
    Node(node::NodeArgs),
    /// Hold the node's FUSE session descriptors so FUSE volumes outlive a crash, restart or
    /// upgrade of `keybroker node` (the chart runs it as a DaemonSet of its own,
    /// keybroker-fd-keeper, never replaced with the node pod; a node started by hand starts
    /// one itself).
    ///
    /// It only keeps descriptors and hands them back (SCM_RIGHTS on a unix socket only its own
    /// uid may use); it reads no FUSE request and holds no secret. Each node keeps a `watch`
    /// connection to it: when the keeper ends, the node's /readyz turns 503 (its FUSE sessions
    /// are held by nobody else), and a keeper that comes back on the same socket is given
    /// every session at once.
    FdKeeper(keeper::FdKeeperArgs),
    /// Serve the Secrets Store CSI driver's provider API (behind an existing driver).
    ///
    /// The driver calls Mount on the unix socket for each pod and at each rotation poll; each
    /// call is authorized against the bindings (default deny), answered from the node-wide
    /// cache and audited, and the driver writes the files. Pods keep their
    /// SecretProviderClasses (Azure and Vault parameter names).
    Provider(provider::ProviderArgs),
    /// Validate a bindings file offline, and explain a decision.
    ///
    /// With only --bindings: checks the file and lists what it grants. With --namespace,
    /// --service-account, --provider and one or more --object: says whether such a pod may
    /// read those objects, and which binding allows it or why each one does not.
    Check(check::CheckArgs),
    /// Work with audit logs.
    Audit(audit::AuditArgs),
}

fn main() -> ExitCode {
    cli::malloc::fix_malloc_mmap_threshold();
    // Before anything reads a secret: no core dumps, in every mode.
    let hardening = keybroker::hardening::disable_core_dumps();
    // rustls's crypto provider (ring) for every HTTPS client of the process.
    keybroker::tls::init();
    let cli = Cli::parse();
    cli::init_logging(cli.log_format, &cli.log);
    // Every request keybroker sends names it and its mode (User-Agent).
    keybroker::tls::set_mode(match &cli.command {
        Command::Node(_) => "node",
        Command::Provider(_) => "provider",
        Command::Init(_) => "init",
        Command::Sidecar(_) => "sidecar",
        Command::Mount(_) => "mount",
        _ => "cli",
    });
    for w in &hardening.warnings {
        tracing::warn!("{w}");
    }
    match cli.command {
        Command::Check(args) => check::run(args),
        Command::Node(args) => node::run(args),
        Command::FdKeeper(args) => keeper::run(args),
        Command::Provider(args) => provider::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Init(args) => pod::init(args),
        Command::Sidecar(args) => pod::sidecar(args),
        Command::Probe(args) => pod::probe(args),
        Command::Mount(args) => mount::run(args),
    }
}
