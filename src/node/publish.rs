use super::*;
use crate::access::Readers;

/// Volume attribute parses that may run at once on the blocking pool.
pub(super) const PARSE_SLOTS: usize = 2;
/// Attributes up to this size (keys and values together) are parsed on the calling worker:
/// with nesting bounded to 32 levels before any parser runs, the worst such input parses in
/// well under a millisecond (`cargo bench --bench hostile_publish`, "8 KiB" row).
pub(super) const INLINE_PARSE_BYTES: usize = 8 * 1024;

/// Marks a publish in flight for [`NodeService::release_unused`]; unmarked when dropped.
pub(super) struct Pending<'a> {
    pub(super) map: &'a Mutex<HashMap<PathBuf, String>>,
    pub(super) target: PathBuf,
}

impl<'a> Pending<'a> {
    pub(super) fn new(
        map: &'a Mutex<HashMap<PathBuf, String>>,
        target: &Path,
        identity: String,
    ) -> Self {
        lock(map).insert(target.to_owned(), identity);
        Self {
            map,
            target: target.to_owned(),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(self.map).remove(&self.target);
    }
}

impl NodeService {
    pub(super) fn deny(&self, pod: Option<&PodInfo>, volume_id: &str, reason: String) -> NodeError {
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, reason = %reason, "publish denied");
        let mut ev = Event::new(EventKind::Deny)
            .volume(volume_id)
            .outcome(Outcome::Denied)
            .error(&reason);
        ev.pod = pod.map(PodInfo::audit_ref);
        self.audit.record(ev);
        NodeError::PermissionDenied(reason)
    }

    /// A provider refused the pod's identity or an object (Vault refused the login, a 403):
    /// that is a denial, audited and counted as one, with the provider's reason code.
    pub(super) fn provider_denied(
        &self,
        pod: &PodInfo,
        volume_id: &str,
        e: &ProviderError,
    ) -> NodeError {
        let code = match e {
            ProviderError::PermissionDenied { code, .. } => code.clone(),
            _ => String::new(),
        };
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, reason = %code, error = %e, "publish denied by the provider");
        self.audit.record(
            Event::new(EventKind::Deny)
                .volume(volume_id)
                .pod(pod.audit_ref())
                .outcome(Outcome::Denied)
                .reason(code)
                .error(e),
        );
        NodeError::PermissionDenied(format!("{pod}: {e}"))
    }

    /// A previous process's mounts were found at a target with no record and cleaned.
    pub(super) fn orphans_cleaned(&self, vid: &str, pod: &PodInfo, target: &Path, n: usize) {
        self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id = vid, target = %target.display(), mounts = n, "cleaned keybroker mounts an earlier process left at the target without a record (a crash during a publish)");
        self.audit.record(
            Event::new(EventKind::Unmount)
                .volume(vid)
                .pod(pod.audit_ref())
                .detail(format!(
                    "{n} keybroker mounts left at the target by an interrupted publish were cleaned"
                )),
        );
    }

    /// Where this node mounts its tmpfs volumes read-write (each target is a read-only bind of
    /// one): under its own state directory, so another node process's (a test beside it, the
    /// other side of a handover with another state directory) are never taken for its own.
    pub(super) fn staging_root(&self) -> PathBuf {
        self.cfg.state_dir.join("staging")
    }

    pub(super) fn fail(&self, pod: Option<&PodInfo>, volume_id: &str, e: NodeError) -> NodeError {
        self.metrics.publish_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume_id, error = %e, "publish failed");
        let mut ev = Event::new(EventKind::Error).volume(volume_id).error(&e);
        ev.pod = pod.map(PodInfo::audit_ref);
        self.audit.record(ev);
        e
    }

    /// Parses a publish request's attributes. Anything over [`INLINE_PARSE_BYTES`] goes to
    /// the blocking pool, at most [`PARSE_SLOTS`] at a time: a pod's large YAML never runs on
    /// the runtime workers that serve every other pod's calls (parsing is bounded in depth and
    /// size too, see [`crate::untrusted`]).
    pub(super) async fn parse_request(
        &self,
        ctx: BTreeMap<String, String>,
        secrets: keybroker_csi::Secrets,
    ) -> Result<VolumeRequest, request::RequestError> {
        self.parse_request_with_mode(ctx, secrets, request::NODE_DEFAULT_MODE)
            .await
    }

    pub(super) async fn parse_request_with_mode(
        &self,
        ctx: BTreeMap<String, String>,
        secrets: keybroker_csi::Secrets,
        mode: u32,
    ) -> Result<VolumeRequest, request::RequestError> {
        let (kind, limits) = (self.cfg.default_kind, self.cfg.limits);
        let size: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
        // YAML anchors and aliases can make a small text expand a lot (the parser caps the
        // expansion, still at tens of milliseconds): text that has the characters goes to the
        // pool whatever its size.
        let may_alias = ctx.values().any(|v| v.contains(['&', '*']));
        if size <= INLINE_PARSE_BYTES && !may_alias {
            // Small attributes (every ordinary volume) parse in microseconds; a hand-off to the
            // blocking pool would cost more than the parse.
            return request::parse_with_mode(&ctx, &secrets, kind, limits, mode);
        }
        let _slot = self.parse_slots.acquire().await;
        tokio::task::spawn_blocking(move || {
            request::parse_with_mode(&ctx, &secrets, kind, limits, mode)
        })
        .await
        .unwrap_or_else(|_| {
            Err(request::RequestError(
                "the volume attributes could not be parsed".into(),
            ))
        })
    }

    pub(super) async fn do_publish(&self, req: PublishRequest) -> Result<(), NodeError> {
        let started = Instant::now();
        let vid = req.volume_id.clone();
        if !self.audit.may_serve() {
            return Err(self.fail(
                None,
                &vid,
                NodeError::Unavailable(format!(
                    "audit log cannot be written: {}; keybroker runs with --audit-fail-closed and publishes nothing until it can (kubelet retries)",
                    self.audit.last_error()
                )),
            ));
        }
        let vr = self
            .parse_request(req.volume_context, req.secrets)
            .await
            .map_err(|e| self.fail(None, &vid, NodeError::InvalidArgument(e.0)))?;
        for t in &vr.tokens {
            token::check(t, &vr.pod, SystemTime::now())
                .map_err(|why| self.deny(Some(&vr.pod), &vid, format!("{}: {why}", vr.pod)))?;
        }
        let target = req.target_path.clone();
        let tlock = self.target_lock(&target);
        let _held = tlock.lock().await;

        // Republish: same volume at the same target.
        let existing = lock(&self.volumes)
            .get(&target)
            .map(|p| (p.volume_id.clone(), p.digest.clone()));
        if let Some((old_id, old_digest)) = existing {
            if old_id != vid {
                return Err(self.fail(
                    Some(&vr.pod),
                    &vid,
                    NodeError::AlreadyExists(format!(
                        "{} already has volume {old_id:?} published",
                        target.display()
                    )),
                ));
            }
            if old_digest != vr.digest {
                return Err(self.fail(
                    Some(&vr.pod),
                    &vid,
                    NodeError::AlreadyExists(format!(
                        "volume {vid:?} is already published at {} with different attributes",
                        target.display()
                    )),
                ));
            }
            let grant = match self.bindings.load().authorize(&vr) {
                Ok(g) => g,
                Err(why) => return Err(self.deny(Some(&vr.pod), &vid, why)),
            };
            // kubelet's fresh tokens keep the identity's login possible.
            if matches!(grant.identity, Identity::Vault(_) | Identity::Azure(_)) {
                self.provider_for(&grant, &vr, &target)
                    .map_err(|e| self.fail(Some(&vr.pod), &vid, e))?;
            }
            if target_alive(&target) {
                self.metrics.republishes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            // The mount died under us: replace it, and say what that means for the pod.
            let msg = "the volume's mount was dead (its FUSE server is gone); remounted. Containers that \
                       already had it mounted keep a dead mount until the pod restarts";
            tracing::error!(volume_id = %vid, target = %target.display(), pod = %vr.pod, "{msg}");
            self.audit.record(
                Event::new(EventKind::Error)
                    .volume(vid.clone())
                    .pod(vr.pod.audit_ref())
                    .detail(msg)
                    .outcome(Outcome::Failure),
            );
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = lock(&self.volumes).remove(&target) {
                p.cancel.cancel();
            }
            detach_all(&self.staging_root(), &target);
        }

        let grant = self
            .bindings
            .load()
            .authorize(&vr)
            .map_err(|why| self.deny(Some(&vr.pod), &vid, why))?;
        // Until the volume is in `volumes`, an unpublish elsewhere must not log its identity
        // out, revoke what it fetched, or drop its service-account token.
        let pending = Pending::new(&self.publishing, &target, identity_key(&grant, &vr.pod));
        let provider = self
            .provider_for(&grant, &vr, &target)
            .map_err(|e| self.fail(Some(&vr.pod), &vid, e))?;
        let adopt = self.claim_unclaimed(&vid, &target, vr.kind);
        let res = self
            .mount_new(&vid, &target, vr, grant, provider, started, adopt)
            .await;
        drop(pending);
        if res.is_err() {
            // Nothing was published: forget the volume's token, drop what it fetched.
            self.release_unused(Release::Revoke).await;
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn mount_new(
        &self,
        vid: &str,
        target: &Path,
        vr: VolumeRequest,
        grant: Grant,
        provider: Arc<dyn Provider>,
        started: Instant,
        adopt: Option<Adopt>,
    ) -> Result<(), NodeError> {
        let pod = vr.pod.clone();
        let identity = identity_key(&grant, &pod);
        let mut refresher = Refresher::new(
            vid.to_owned(),
            vr.content.clone(),
            provider.clone(),
            identity.clone(),
            self.cache.clone(),
            self.audit.clone(),
        )
        .with_pod(pod.audit_ref());
        if vr.own_values {
            refresher = refresher.with_own_values();
        }
        let (mut undo, rendered) = self
            .prepare_and_render(vid, target, &pod, &refresher, adopt.is_none())
            .await?;
        // The record goes down before the mount exists: after a crash at any later point the
        // next process finds the record and repairs, adopts or cleans the target.
        let record = VolumeRecord {
            volume_id: vid.to_owned(),
            target: target.to_owned(),
            kind: vr.kind,
            attributes: vr.attributes.clone(),
            fuse: match &adopt {
                Some(Adopt::Fuse { rec, .. }) => Some(rec.clone()),
                _ => None,
            },
        };
        let path = record_path(&self.cfg.state_dir, target);
        if let Err(e) = write_record(&path, &record) {
            undo.run();
            return Err(self.fail(
                Some(&pod),
                vid,
                NodeError::Internal(format!(
                    "cannot record the volume in {}: {e}",
                    path.display()
                )),
            ));
        }
        undo.record = Some(path);
        let (volume, session) = self
            .mount_volume(
                vid,
                target,
                adopt,
                &record,
                &rendered.files,
                vr.kind,
                &pod,
                &grant.readers,
            )
            .map_err(|why| {
                undo.run();
                self.fail(Some(&pod), vid, NodeError::Internal(why))
            })?;
        // A mounted volume that cannot be completed is taken down again, and nothing is left.
        let abandon = |volume: Box<dyn Volume>, why: String| {
            let _ = volume.unmount();
            detach_all(&self.staging_root(), target);
            undo.run();
            self.fail(Some(&pod), vid, NodeError::Internal(why))
        };
        let (volume, bound) = match self
            .complete_volume(vid, target, &vr, &grant.readers, volume, &rendered.files)
            .await
        {
            Ok(done) => done,
            Err((volume, why)) => return Err(abandon(volume, why)),
        };
        let _ = refresher.refresh(volume.as_ref()).await;
        let volume = self.with_rotation_notice(vid, &vr, volume);
        let cancel = CancellationToken::new();
        let api = bound.map(|(bound, b)| {
            let stop = cancel.clone();
            let volume_id = vid.to_owned();
            tokio::spawn(async move {
                let res =
                    keybroker_csi::broker::serve_bound(bound, b, stop.cancelled_owned()).await;
                if let Err(e) = res {
                    tracing::error!(volume_id = %volume_id, error = %e, "the volume's broker API stopped");
                }
            })
        });
        if let Some(s) = session {
            self.keep_session(target, s);
        }
        let files = rendered.files.len();
        self.register(
            vid, target, &vr, &grant, identity, provider, refresher, volume, cancel, api, files,
            started,
        );
        tracing::info!(volume_id = vid, pod = %pod, binding = %grant.binding, kind = %vr.kind, "published");
        Ok(())
    }

    /// Prepares the target (a new publish: cleaned of what a crashed process left, an empty
    /// directory of its own) and renders the volume's files; on error nothing is left.
    async fn prepare_and_render(
        &self,
        vid: &str,
        target: &Path,
        pod: &PodInfo,
        refresher: &Refresher,
        new: bool,
    ) -> Result<(Undo, crate::refresh::Rendered), NodeError> {
        let mut undo = Undo {
            target: target.to_owned(),
            created: false,
            record: None,
        };
        if new {
            let prepared =
                mountpoint::prepare_target(target, &self.staging_root()).map_err(|e| {
                    self.fail(Some(pod), vid, NodeError::InvalidArgument(e.to_string()))
                })?;
            undo.created = prepared.created;
            if prepared.orphans_cleaned > 0 {
                self.orphans_cleaned(vid, pod, target, prepared.orphans_cleaned);
            }
        }
        match refresher.render().await {
            Ok(r) => Ok((undo, r)),
            Err(RefreshError::Provider(p @ ProviderError::PermissionDenied { .. })) => {
                undo.run();
                Err(self.provider_denied(pod, vid, &p))
            }
            Err(e) => {
                undo.run();
                let ne = match &e {
                    RefreshError::Provider(p) => provider_error(pod, p),
                    RefreshError::Content(c) => NodeError::FailedPrecondition(c.to_string()),
                };
                Err(self.fail(Some(pod), vid, ne))
            }
        }
    }

    /// The volume is complete: its refresher runs, it is listed as published, counted and
    /// audited.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        vid: &str,
        target: &Path,
        vr: &VolumeRequest,
        grant: &Grant,
        identity: String,
        provider: Arc<dyn Provider>,
        refresher: Refresher,
        volume: Box<dyn Volume>,
        cancel: CancellationToken,
        api: Option<JoinHandle<()>>,
        files: usize,
        started: Instant,
    ) {
        let pod = &vr.pod;
        let keys = refresher.keys();
        let status = refresher.status();
        let poll = self.cfg.poll;
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            refresher.run(volume.as_ref(), c, poll).await;
            volume
        });
        lock(&self.volumes).insert(
            target.to_owned(),
            Published {
                volume_id: vid.to_owned(),
                digest: vr.digest.clone(),
                pod: pod.clone(),
                binding: grant.binding.clone(),
                identity: identity.clone(),
                provider: provider.clone(),
                keys,
                status,
                cancel,
                task,
                api,
            },
        );
        self.metrics.publishes.fetch_add(1, Ordering::Relaxed);
        self.audit.record(
            Event::new(EventKind::Mount)
                .volume(vid)
                .pod(pod.audit_ref())
                .identity(identity)
                .provider(provider.kind())
                .detail(format!(
                    "binding {}; {} files; {}",
                    grant.binding, files, vr.kind
                ))
                .latency(started.elapsed()),
        );
    }

    /// Mounts the volume at `target` (or serves on what a previous process left there) with
    /// the rendered `files`; a FUSE volume also returns its session for the keeper. On error
    /// nothing is mounted.
    #[allow(clippy::too_many_arguments)]
    fn mount_volume(
        &self,
        vid: &str,
        target: &Path,
        adopt: Option<Adopt>,
        record: &VolumeRecord,
        files: &[crate::volume::content::RenderedFile],
        kind: VolumeKind,
        pod: &PodInfo,
        readers: &Readers,
    ) -> Result<(Box<dyn Volume>, Option<Session>), String> {
        let owner = Owner { uid: 0, gid: 0 };
        match (adopt, kind) {
            (Some(Adopt::Tmpfs(t)), _) => Ok((Box::new(t), None)),
            (adopt @ (None | Some(Adopt::Fuse { .. })), VolumeKind::Fuse) => {
                let opts = FuseOptions {
                    threads: 1,
                    allow_other: true,
                    kernel_cache: true,
                    linger: self.cfg.fuse_linger,
                };
                let audit = Some(self.audit.clone());
                let path = record_path(&self.cfg.state_dir, target);
                // Every change of the inode table is recorded before the kernel can see it.
                let record_table = |fs: &MemFs, conn: u32, minor: u32| {
                    let (base, path) = (record.clone(), path.clone());
                    fs.on_table(move |t| {
                        let mut r = base.clone();
                        r.fuse = Some(FuseRecord {
                            conn,
                            minor,
                            inodes: t.clone(),
                        });
                        if let Err(e) = write_record(&path, &r) {
                            tracing::warn!(record = %path.display(), error = %e, "cannot record the volume's inode table; a restart will remount it");
                        }
                    });
                };
                // Served by a task on the runtime: threads do not grow with volumes.
                let mounted = match adopt {
                    Some(Adopt::Fuse { fd, rec }) => {
                        let fs = Arc::new(
                            MemFs::restore(vid, owner, audit, rec.inodes.clone())
                                .with_pod(pod.audit_ref())
                                .with_readers(readers.clone()),
                        );
                        fs.apply(files);
                        record_table(&fs, rec.conn, rec.minor);
                        MuxVolume::adopt(target, fd, fs, &opts, rec.minor)
                    }
                    _ => {
                        let fs = Arc::new(
                            MemFs::new(vid, owner, audit)
                                .with_pod(pod.audit_ref())
                                .with_readers(readers.clone()),
                        );
                        fs.apply(files);
                        MuxVolume::mount(target, fs, &opts).inspect(|v| {
                            record_table(v.fs(), v.connection(), v.minor());
                        })
                    }
                };
                let v = mounted.map_err(|e| e.to_string())?;
                let session = match v.session_fd().try_clone_to_owned() {
                    Ok(fd) => Some(Session {
                        key: record_key(target),
                        fd,
                        fs: v.fs().clone(),
                    }),
                    Err(e) => {
                        tracing::warn!(volume_id = vid, error = %e, "cannot duplicate the FUSE session descriptor; the volume will not survive a restart");
                        None
                    }
                };
                Ok((Box::new(v), session))
            }
            (Some(Adopt::Fuse { .. }), VolumeKind::Tmpfs) => {
                Err("a FUSE session recorded for a tmpfs volume".into())
            }
            (None, VolumeKind::Tmpfs) => {
                let v = TmpfsVolume::mount(
                    target,
                    &mountpoint::staging_dir(&self.staging_root(), target),
                    self.cfg.limits.max_volume_bytes * 3,
                    owner,
                )
                .map_err(|e| e.to_string())?;
                Ok((Box::new(v), None))
            }
        }
    }

    /// What a mounted volume needs before the pod may see it: its opens audited (tmpfs), its
    /// broker API (`api: "true"`) wrapped around it and its socket bound, the files written.
    /// On error the volume comes back with the reason, for the caller to take down.
    #[allow(clippy::type_complexity)]
    async fn complete_volume(
        &self,
        vid: &str,
        target: &Path,
        vr: &VolumeRequest,
        readers: &Readers,
        volume: Box<dyn Volume>,
        files: &[crate::volume::content::RenderedFile],
    ) -> Result<
        (
            Box<dyn Volume>,
            Option<(keybroker_csi::broker::Bound, Arc<crate::broker::Broker>)>,
        ),
        (Box<dyn Volume>, String),
    > {
        let pod = &vr.pod;
        // Every open of a tmpfs volume is audited (fanotify mark on its tmpfs instance),
        // before the pod can see it.
        let volume: Box<dyn Volume> = match (&self.opens, volume.kind()) {
            (Some(o), VolumeKind::Tmpfs) => {
                let root = mountpoint::staging_dir(&self.staging_root(), target);
                if let Err(e) = o.watch(vid, &root, Some(pod.audit_ref()), readers.clone()) {
                    return Err((
                        volume,
                        format!("cannot audit the volume's opens (fanotify mark): {e}"),
                    ));
                }
                Box::new(Audited::new(volume, o.clone(), root))
            }
            _ => volume,
        };
        // `api: "true"`: what the volume holds is also what its broker API serves.
        let broker = vr.api.then(|| {
            Arc::new(
                crate::broker::Broker::new(
                    crate::broker::Admission::Pod(pod.uid.clone()),
                    self.audit.clone(),
                    vid.to_owned(),
                    Some(pod.audit_ref()),
                )
                .with_executables(readers.executables.clone()),
            )
        });
        let volume: Box<dyn Volume> = match &broker {
            Some(b) => Box::new(crate::broker::Serving::new(volume, b.clone())),
            None => volume,
        };
        if let Err(e) = volume.apply(files) {
            return Err((volume, e.to_string()));
        }
        // The broker socket: in the volume's own tmpfs (written through the staging mount,
        // seen by the pod at the target), bound before the publish returns so the pod finds it
        // at start. Any uid may connect; the caller's cgroup decides who is served.
        let Some(b) = broker else {
            return Ok((volume, None));
        };
        let sock =
            mountpoint::staging_dir(&self.staging_root(), target).join(crate::broker::NODE_SOCKET);
        match keybroker_csi::broker::bind(&sock, 0o666).await {
            Ok(bound) => Ok((volume, Some((bound, b)))),
            Err(e) => Err((
                volume,
                format!("cannot create the broker API socket in the volume: {e}"),
            )),
        }
    }

    /// Rotation notices to the pod's own processes (`onChange`; through hostPID, checked by
    /// cgroup), each audited.
    fn with_rotation_notice(
        &self,
        vid: &str,
        vr: &VolumeRequest,
        volume: Box<dyn Volume>,
    ) -> Box<dyn Volume> {
        if vr.on_change.is_empty() {
            return volume;
        }
        let (actions, uid, audit, volume_id) = (
            vr.on_change.clone(),
            vr.pod.uid.clone(),
            self.audit.clone(),
            vid.to_owned(),
        );
        let pod_ref = vr.pod.audit_ref();
        Box::new(crate::volume::Notifying::new(volume, move |changed| {
            for (process, signal) in &actions {
                let res = crate::notify::signal_by_name(process, *signal, Some(&uid));
                let mut ev = Event::new(EventKind::Rotate)
                    .volume(volume_id.clone())
                    .pod(pod_ref.clone())
                    .detail(format!(
                        "onChange signal {signal} to {process} after {} changed files",
                        changed.len()
                    ));
                if let Err(e) = &res {
                    tracing::warn!(volume_id = %volume_id, error = %e, "rotation notice failed");
                    ev = ev.outcome(Outcome::Failure).error(e);
                }
                audit.record(ev);
            }
        }))
    }
}

/// What a publish that fails part-way removes: the volume's record once written, and the
/// target directory if the publish created it.
struct Undo {
    target: PathBuf,
    created: bool,
    record: Option<PathBuf>,
}

impl Undo {
    fn run(&self) {
        if let Some(r) = &self.record {
            super::records::remove_record(r);
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.target);
        }
    }
}
