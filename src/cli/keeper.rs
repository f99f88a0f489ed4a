//! `keybroker fd-keeper`: holds FUSE session descriptors (and listening sockets) across
//! keybroker restarts.

use std::path::PathBuf;
use std::process::ExitCode;

use super::raise_fd_limit;

#[derive(clap::Args)]
pub struct FdKeeperArgs {
    /// The unix socket the node talks to (`keybroker node --fd-keeper-socket`, by default
    /// `<state-dir>/keeper.sock`). Created 0600; only this process's uid may connect. A
    /// second keeper on a socket that answers refuses to start.
    #[arg(long, default_value = "/run/keybroker/keeper.sock")]
    pub socket: PathBuf,
    /// Exit once it has held nothing and heard from nobody for this long: a duration such
    /// as `60s`, `5m` or `1h 30m`. Without it the keeper runs until asked to quit (the
    /// chart's keeper DaemonSet).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub exit_when_idle: Option<std::time::Duration>,
    /// Exit as soon as its node has exited and nothing is held (what `keybroker node
    /// --fd-keeper auto` asks of the keeper it starts). Its node is the process that
    /// started it, or the `keybroker node` that last checked on it. While it holds FUSE
    /// sessions it stays, which is what it is for.
    #[arg(long)]
    pub exit_with_node: bool,
}

/// `keybroker fd-keeper`.
pub fn run(args: FdKeeperArgs) -> ExitCode {
    let FdKeeperArgs {
        socket,
        exit_when_idle,
        exit_with_node,
    } = args;
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
