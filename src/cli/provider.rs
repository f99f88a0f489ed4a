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
    /// A volume no Mount has asked for in this long is forgotten: its cached values, the pod's
    /// service-account token and the identity's login (when no other volume uses them) are
    /// dropped from memory, zeroized. The driver calls Mount at every rotation poll
    /// (--rotation-poll-interval, 2m by default) and never says when a pod is gone, so keep
    /// this above that interval; a volume asked for again later is simply fetched again.
    /// Leases and Vault tokens are left to expire at their TTL, not revoked: a pod whose
    /// driver does not rotate keeps using the credential it was given.
    #[arg(long, env = "KEYBROKER_FORGET_IDLE_AFTER", default_value = "10m", value_parser = parse_idle)]
    pub forget_idle_after: std::time::Duration,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `--forget-idle-after`: a duration of at least a second (0 would forget every value between
/// two Mounts and send every Mount to the provider).
fn parse_idle(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is too short: at least 1s, and above the driver's --rotation-poll-interval (2m by default) to keep its polls cached"
        ));
    }
    Ok(d)
}

/// `keybroker provider`: the Secrets Store CSI driver's provider API.
pub fn run(args: ProviderArgs) -> ExitCode {
    let ProviderArgs {
        endpoint,
        forget_idle_after,
        serve,
    } = args;
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
        forget_idle_after: Some(forget_idle_after),
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
