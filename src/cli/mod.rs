//! The command line's shared pieces: logging, signals, runtimes, exit codes; each subcommand's
//! arguments and start-up are in a module of its own.

pub mod audit;
pub mod check;
pub mod keeper;
pub mod malloc;
pub mod mount;
pub mod node;
pub mod pod;
pub mod provider;
pub mod serve;

use std::process::ExitCode;

use clap::ValueEnum;
use tokio_util::sync::CancellationToken;

use keybroker::volume::VolumeKind;

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Fuse,
    Tmpfs,
}

pub fn init_logging(format: LogFormat, filter: &str) {
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

pub fn shutdown_on_signals() -> CancellationToken {
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

pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    runtime_of(tokio::runtime::Builder::new_multi_thread().worker_threads(2))
}

/// The runtime `builder` builds (with I/O and timers), or exit status 2 with the reason.
pub fn runtime_of(
    builder: &mut tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::from(2)
    })
}

/// Exit status of a long-running command: 0, or 1 with the error on stderr and in the log.
pub fn exit_code(res: anyhow::Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub fn kind(k: KindArg) -> VolumeKind {
    match k {
        KindArg::Fuse => VolumeKind::Fuse,
        KindArg::Tmpfs => VolumeKind::Tmpfs,
    }
}

/// Raises the soft limit of open descriptors to the hard one: the node holds two per FUSE
/// volume (the session and the duplicate it hands over), the keeper one per volume.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit");
    }
}
