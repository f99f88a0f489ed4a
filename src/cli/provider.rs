//! `keybroker provider`: the Secrets Store CSI driver's provider API, beside an installed driver.

use std::process::ExitCode;

use super::exit_code;
use super::serve::{ServeArgs, Serving, run_node};

#[derive(clap::Args)]
pub struct ProviderArgs {
    /// The socket in the driver's providers directory (its --provider-volume).
    #[arg(
        long,
        env = "KEYBROKER_PROVIDER_ENDPOINT",
        default_value = "unix:///etc/kubernetes/secrets-store-csi-providers/keybroker.sock"
    )]
    pub endpoint: String,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `keybroker provider`: the Secrets Store CSI driver's provider API.
pub fn run(args: ProviderArgs) -> ExitCode {
    let ProviderArgs { endpoint, serve } = args;
    let (azure_managed, rt) = match serve.start() {
        Ok(started) => started,
        Err(code) => return code,
    };
    // No volumes of its own: the state directory only ever stays empty.
    let state_dir = std::env::temp_dir().join(format!("keybroker-provider-{}", std::process::id()));
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
        audit_opens: None,
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
