use super::*;

impl NodeService {
    pub(super) async fn do_unpublish(&self, req: UnpublishRequest) -> Result<(), NodeError> {
        let target = req.target_path;
        let tlock = self.target_lock(&target);
        let _held = tlock.lock().await;
        // The record goes first: a crash after this leaves at most a mount without a record,
        // which kubelet's retried unpublish (or the next publish there) cleans.
        remove_record(&record_path(&self.cfg.state_dir, &target));
        self.forget_session(&target);
        let entry = lock(&self.volumes).remove(&target);
        let mut ev = Event::new(EventKind::Unmount).volume(req.volume_id.clone());
        match entry {
            Some(p) => {
                self.metrics.rotations_retired.fetch_add(
                    p.status.rotations.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                p.cancel.cancel();
                if let Some(api) = p.api {
                    let _ = api.await;
                }
                match p.task.await {
                    Ok(volume) => {
                        if let Err(e) = volume.unmount() {
                            tracing::warn!(error = %e, "unmount reported an error; detaching");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the volume's task failed; detaching");
                    }
                }
                // Anything stacked under or over it by a crashed process goes too.
                let extra = detach_all(&self.staging_root(), &target);
                if extra > 0 {
                    tracing::warn!(target = %target.display(), mounts = extra, "detached keybroker mounts stacked at the target");
                }
                ev.pod = Some(p.pod.audit_ref());
                ev.detail = Some(format!("binding {}", p.binding));
                tracing::info!(volume_id = %p.volume_id, pod = %p.pod, "unpublished");
            }
            None => {
                // Unknown to this process: a leftover of a previous one (a session kept for a
                // damaged record), or nothing at all.
                let kept = self.close_unclaimed(&req.volume_id, &target);
                detach_all(&self.staging_root(), &target);
                ev.detail = Some(if kept {
                    "the volume of a damaged record (its session kept until now) unmounted".into()
                } else {
                    "no volume of this process was published there".into()
                });
            }
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "cannot remove the target directory")
            }
        }
        self.release_unused(Release::Revoke).await;
        self.metrics.unpublishes.fetch_add(1, Ordering::Relaxed);
        self.audit.record(ev);
        lock(&self.target_locks).remove(&target);
        if let Some(release) = self.cfg.release_memory {
            // Once unpublishes have been quiet for a second, the freed heap goes back.
            let seen = self.unpublished.fetch_add(1, Ordering::Relaxed) + 1;
            let count = self.unpublished.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if count.load(Ordering::Relaxed) == seen {
                    let _ = tokio::task::spawn_blocking(release).await;
                }
            });
        }
        Ok(())
    }

    /// Drops cached values no volume (published, or a Secrets Store volume provider mode
    /// remembers) needs any more (zeroized on drop), the pod tokens of volumes that are gone,
    /// and the identities no volume uses; with [`Release::Revoke`] also revokes the dropped
    /// values' leases and logs those Vault identities out.
    pub(super) async fn release_unused(&self, how: Release) {
        let pending: HashMap<PathBuf, String> = lock(&self.publishing).clone();
        let (in_use, identities, providers) = {
            let vols = lock(&self.volumes);
            let mounts = lock(&self.provider_mounts);
            // (identity, provider, keys) of every volume.
            let all = vols
                .values()
                .map(|p| (&p.identity, &p.provider, &p.keys))
                .chain(mounts.values().map(|m| (&m.identity, &m.provider, &m.keys)));
            let mut keys = std::collections::HashSet::<CacheKey>::new();
            let mut ids: std::collections::HashSet<String> = pending.values().cloned().collect();
            let mut providers = HashMap::<String, Arc<dyn Provider>>::new();
            for (identity, provider, k) in all {
                keys.extend(k.iter().cloned());
                ids.insert(identity.clone());
                providers.insert(identity.clone(), provider.clone());
            }
            (keys, ids, providers)
        };
        // Values of identities with a publish in flight stay: that volume is about to use them.
        let evicted = self
            .cache
            .retain(|k| in_use.contains(k) || pending.values().any(|i| *i == k.identity));
        let targets: std::collections::HashSet<String> = {
            // The same order as above (volumes, then provider mounts): no lock-order deadlock
            // between two concurrent releases.
            let vols = lock(&self.volumes);
            let mounts = lock(&self.provider_mounts);
            vols.keys()
                .chain(mounts.keys())
                .chain(pending.keys())
                .map(|t| t.to_string_lossy().into_owned())
                .collect()
        };
        let idle: Vec<Arc<VaultProvider>> = {
            let mut vaults = lock(&self.vaults);
            let idle_keys: Vec<String> = vaults
                .keys()
                .filter(|k| !identities.contains(*k))
                .cloned()
                .collect();
            for p in vaults.values() {
                p.retain_jwts(|volume| targets.contains(volume));
            }
            idle_keys.iter().filter_map(|k| vaults.remove(k)).collect()
        };
        {
            // Azure identities no volume uses are dropped (their token refresh stops with them).
            let mut azures = lock(&self.azures);
            azures.retain(|k, _| identities.contains(k));
            for p in azures.values() {
                p.tokens().retain_jwts(|volume| targets.contains(volume));
            }
            let used: std::collections::HashSet<*const azure::TokenSource> =
                azures.values().map(|p| Arc::as_ptr(p.tokens())).collect();
            lock(&self.managed_tokens).retain(|_, t| used.contains(&Arc::as_ptr(t)));
        }
        if how == Release::Forget {
            // Dropped here (values zeroized); leases and tokens end at their TTL.
            return;
        }
        for (key, object) in evicted {
            if object.lease.is_none() {
                continue;
            }
            let provider: Option<Arc<dyn Provider>> =
                providers.get(&key.identity).cloned().or_else(|| {
                    idle.iter()
                        .find(|p| p.identity() == key.identity)
                        .map(|p| p.clone() as Arc<dyn Provider>)
                });
            if let Some(p) = provider {
                p.release(&object).await;
            }
        }
        for p in idle {
            p.revoke().await;
        }
    }
}
