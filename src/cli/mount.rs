//! `keybroker mount`: a secrets volume on a directory, for developers.

use std::path::PathBuf;
use std::process::ExitCode;

use keybroker::mount::MountOverrides;
use keybroker::volume::VolumeKind;

use super::{KindArg, exit_code, shutdown_on_signals};

#[derive(clap::Args)]
pub struct MountArgs {
    /// The volume config (YAML); see examples/quickstart.yaml.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Serve with FUSE (default, from memory) or write files on a tmpfs (needs root).
    #[arg(long = "type", value_enum)]
    pub kind: Option<KindArg>,
    /// Write the audit log here instead of the config's audit.path.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Key the audit chain with HMAC-SHA256 (a file of 64 hex digits or >= 32 bytes):
    /// forging, truncating or re-chaining the log then needs the key.
    #[arg(long, env = "KEYBROKER_AUDIT_KEY_FILE")]
    pub audit_key: Option<PathBuf>,
    /// Where to mount; created when missing.
    pub dir: PathBuf,
}

/// `keybroker mount`.
pub fn run(args: MountArgs) -> ExitCode {
    let MountArgs {
        config,
        kind,
        audit_log,
        audit_key,
        dir,
    } = args;
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
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
