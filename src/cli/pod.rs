//! `keybroker init`, `sidecar` and `probe`: the pod-side runs.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{exit_code, shutdown_on_signals};

#[derive(clap::Args)]
pub struct InitArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    /// Where the files go (a shared emptyDir, medium: Memory); kubelet's atomic layout.
    #[arg(long)]
    pub dir: PathBuf,
    /// The audit log (overrides the config's audit.path); `-` writes the records to
    /// standard output as JSON lines (logs go to standard error).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct SidecarArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    #[arg(long)]
    pub dir: PathBuf,
    /// /healthz and /readyz (200 only after the first complete write).
    #[arg(long, default_value = "127.0.0.1:8099")]
    pub health_addr: String,
    /// The audit log (overrides the config's audit.path); `-` for standard output.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Serve the broker API (Get/List/Watch) on this unix socket, e.g. in the shared
    /// emptyDir.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A caller uid the broker API serves (repeatable; default: the sidecar's own uid).
    /// Callers are identified by the kernel (SO_PEERCRED); others are refused and audited.
    #[arg(long)]
    pub api_uid: Vec<u32>,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// The directory `keybroker init` or `sidecar` writes (its --dir).
    #[arg(long)]
    pub dir: PathBuf,
}

/// `keybroker init`: writes the files once and exits.
pub fn init(args: InitArgs) -> ExitCode {
    in_pod(keybroker::sidecar::Options {
        config: args.config,
        dir: args.dir,
        once: true,
        health_addr: None,
        audit_path: args.audit_log,
        api_socket: None,
        api_uids: Vec::new(),
    })
}

/// `keybroker sidecar`: writes the files and keeps them fresh.
pub fn sidecar(args: SidecarArgs) -> ExitCode {
    in_pod(keybroker::sidecar::Options {
        config: args.config,
        dir: args.dir,
        once: false,
        health_addr: Some(args.health_addr),
        audit_path: args.audit_log,
        api_socket: args.api_socket,
        api_uids: args.api_uid,
    })
}

/// `keybroker probe`: whether the files were written completely.
pub fn probe(args: ProbeArgs) -> ExitCode {
    if keybroker::sidecar::probe(&args.dir) {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: no complete write yet", args.dir.display());
        ExitCode::from(1)
    }
}

/// `init` and `sidecar`: the pod-side runs. One pod's files need no parallelism: a
/// single-threaded runtime (blocking work still goes to tokio's blocking pool), and one malloc
/// arena (`in_pod_malloc`), keep the container small (BENCHMARKS.md, sidecar memory).
fn in_pod(opts: keybroker::sidecar::Options) -> ExitCode {
    super::malloc::in_pod_malloc();
    let rt = match super::runtime_of(&mut tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let res = rt.block_on(async {
        let shutdown = shutdown_on_signals();
        keybroker::sidecar::run(opts, shutdown).await
    });
    exit_code(res)
}
