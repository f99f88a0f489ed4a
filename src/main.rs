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
        /// Where to mount; created when missing.
        dir: PathBuf,
    },
    /// Work with audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain; exit 1 naming the first broken line.
    Verify {
        /// The audit log (JSON lines); its `.head` anchor next to it is checked too.
        file: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    match cli.command {
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match keybroker::audit::verify(&file) {
            Ok(Ok(report)) => {
                println!(
                    "ok: {} records, chain intact{}",
                    report.records,
                    if report.anchored {
                        ", head anchor matches"
                    } else {
                        " (no head anchor found)"
                    }
                );
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
        },
        Command::Mount {
            config,
            kind,
            audit_log,
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
            };
            let res = rt.block_on(async {
                let shutdown = shutdown_on_signals();
                keybroker::mount::run(&config, &dir, overrides, shutdown).await
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
