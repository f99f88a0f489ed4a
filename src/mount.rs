//! `keybroker mount`: one volume on a directory of this machine, kept fresh until a signal.
//!
//! Order matters for "nothing is mounted half-way": the config is validated, the target is
//! claimed (and a stale mount of a killed keybroker cleaned), every object is fetched and every
//! file rendered, and only then is anything mounted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event, EventKind};
use crate::cache::FetchCache;
use crate::config::MountConfig;
use crate::refresh::Refresher;
use crate::volume::fuse::{FuseOptions, FuseVolume};
use crate::volume::memfs::MemFs;
use crate::volume::tmpfs::TmpfsVolume;
use crate::volume::{Owner, Volume, VolumeKind, mountpoint};

/// Overrides from the command line.
#[derive(Clone, Debug, Default)]
pub struct MountOverrides {
    pub kind: Option<VolumeKind>,
    pub audit_path: Option<PathBuf>,
    /// Key the audit chain (`--audit-key`).
    pub audit_key: Option<PathBuf>,
}

/// Runs `keybroker mount` until `shutdown` is cancelled.
pub async fn run(
    config_path: &Path,
    dir: &Path,
    overrides: MountOverrides,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut cfg = MountConfig::load(config_path)?;
    if let Some(k) = overrides.kind {
        cfg.kind = k;
    }
    if let Some(a) = overrides.audit_path {
        cfg.audit_path = a;
    }
    let (claim, cleaned) = mountpoint::claim(dir)?;
    let target = claim.path().to_owned();
    let volume_id = target.display().to_string();
    let key = overrides
        .audit_key
        .as_deref()
        .map(crate::audit::AuditKey::load)
        .transpose()?;
    let audit = AuditLog::open_keyed(&cfg.audit_path, cfg.fail_closed, key)?;
    if cleaned {
        audit.record(
            Event::new(EventKind::Unmount)
                .volume(volume_id.clone())
                .error("stale mount of a keybroker that is no longer running was cleaned"),
        );
    }
    let provider = crate::sidecar::build_provider(&cfg, shutdown.child_token())?;
    let cache = Arc::new(FetchCache::new(cfg.poll));
    let mut refresher = Refresher::new(
        volume_id.clone(),
        cfg.content.clone(),
        provider.clone(),
        "local",
        cache,
        audit.clone(),
    );

    let started = Instant::now();
    let first = match refresher.render().await {
        Ok(r) => r,
        Err(e) => {
            audit.record(
                Event::new(EventKind::Mount)
                    .volume(volume_id.clone())
                    .provider(provider.kind())
                    .error(&e),
            );
            audit.close();
            anyhow::bail!("nothing was mounted at {}: {e}", target.display());
        }
    };
    let owner = Owner {
        uid: cfg.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
        gid: cfg.gid.unwrap_or_else(|| nix::unistd::getegid().as_raw()),
    };
    let volume: Box<dyn Volume> = match cfg.kind {
        VolumeKind::Fuse => {
            let fs = Arc::new(MemFs::new(&volume_id, owner, Some(audit.clone())));
            // Content is in place before the kernel can send the first request.
            fs.apply(&first.files);
            // Other users (pods' uids) may read only when we are root; a developer's own mount
            // stays private to them (allow_other needs user_allow_other in /etc/fuse.conf).
            let opts = FuseOptions {
                threads: cfg.fuse_threads,
                allow_other: nix::unistd::geteuid().is_root(),
                ..FuseOptions::default()
            };
            Box::new(FuseVolume::mount(&target, fs, &opts)?)
        }
        VolumeKind::Tmpfs => {
            // Room for two snapshots (old and new) during a rotation, plus slack.
            let size = cfg.content.limits.max_volume_bytes * 3;
            let v = TmpfsVolume::mount(
                &target,
                &mountpoint::staging_dir(&mountpoint::default_staging_root(), &target),
                size,
                owner,
            )?;
            v.apply(&first.files)?;
            Box::new(v)
        }
    };
    // Record the versions just mounted so the first real change is reported as a rotation.
    refresher.refresh(volume.as_ref()).await.ok();
    audit.record(
        Event::new(EventKind::Mount)
            .volume(volume_id.clone())
            .provider(provider.kind())
            .latency(started.elapsed()),
    );
    tracing::info!(
        target_dir = %target.display(),
        kind = %cfg.kind,
        files = cfg.content.files.len(),
        poll = ?cfg.poll,
        audit_log = %cfg.audit_path.display(),
        "mounted"
    );

    refresher.run(volume.as_ref(), shutdown, cfg.poll).await;

    tracing::info!(target_dir = %target.display(), "unmounting");
    let res = volume.unmount();
    let mut ev = Event::new(EventKind::Unmount).volume(volume_id);
    if let Err(e) = &res {
        ev = ev.error(e);
    }
    audit.record(ev);
    audit.close();
    drop(claim);
    res?;
    Ok(())
}
