use super::*;

/// A volume a previous process left mounted, to serve on.
pub(super) enum Adopt {
    Tmpfs(TmpfsVolume),
    Fuse {
        fd: std::os::fd::OwnedFd,
        rec: FuseRecord,
    },
}

/// What [`NodeService::recover_one`] says of a tmpfs volume it kept serving.
pub(super) const TAKEN_OVER: &str = "tmpfs volume taken over after restart";
/// ... and of a FUSE session it serves on.
pub(super) const FUSE_TAKEN_OVER: &str = "FUSE session taken over after restart";

impl NodeService {
    /// The session kept for `target` whose record was damaged, to serve again now that
    /// kubelet publishes the target (`kind` FUSE, its connection still mounted there); `None`
    /// when there is none. One that cannot be served is closed, and said so.
    pub(super) fn claim_unclaimed(
        &self,
        vid: &str,
        target: &Path,
        kind: VolumeKind,
    ) -> Option<Adopt> {
        let key = record_key(target);
        let fd = lock(&self.unclaimed).remove(&key)?;
        let conn = crate::volume::fuse::connection_id(target);
        let usable = kind == VolumeKind::Fuse && !crate::keeper::ended(fd.as_fd());
        let Some(conn) = conn.filter(|_| usable) else {
            drop(fd);
            if let Some(k) = &self.cfg.keeper {
                let _ = k.drop_fd(&key);
            }
            lock(&self.keeper_state).held.remove(&key);
            self.audit.record(
                Event::new(EventKind::Unmount)
                    .volume(vid.to_owned())
                    .outcome(Outcome::Failure)
                    .detail("the FUSE session kept for a damaged record cannot be served (not FUSE, or no longer mounted at the target); closed, the volume is mounted anew"),
            );
            return None;
        };
        self.audit.record(
            Event::new(EventKind::Mount)
                .volume(vid.to_owned())
                .detail("FUSE session kept for a damaged record served again at kubelet's publish (readers waited; its previous inode numbers are stale, names are looked up anew)"),
        );
        tracing::warn!(volume_id = vid, target = %target.display(), "serving again the FUSE session of a damaged record");
        Some(Adopt::Fuse {
            fd,
            rec: FuseRecord {
                conn,
                // What every kernel since 5.4 agrees to with keybroker (the previous
                // process's choice is in the lost record).
                minor: crate::volume::fusewire::MINOR,
                inodes: crate::volume::memfs::InodeTable::fresh(),
            },
        })
    }

    /// Closes the session kept for `target`'s damaged record (kubelet unpublished it).
    pub(super) fn close_unclaimed(&self, vid: &str, target: &Path) -> bool {
        let key = record_key(target);
        let Some(fd) = lock(&self.unclaimed).remove(&key) else {
            return false;
        };
        drop(fd);
        if let Some(k) = &self.cfg.keeper {
            let _ = k.drop_fd(&key);
        }
        lock(&self.keeper_state).held.remove(&key);
        self.audit.record(
            Event::new(EventKind::Unmount)
                .volume(vid.to_owned())
                .detail("FUSE session kept for a damaged record closed at kubelet's unpublish"),
        );
        true
    }

    /// Takes over the volumes a previous keybroker process published (from the state
    /// directory): tmpfs volumes keep being served; FUSE sessions whose descriptor came back
    /// (`sessions`, from the keeper or a handover, by record key) are served again without a
    /// new INIT; other FUSE mounts are dead and replaced. Descriptors of no recorded volume are
    /// closed. Every outcome is audited.
    pub async fn recover(&self, mut sessions: BTreeMap<String, std::os::fd::OwnedFd>) {
        let dir = self.cfg.state_dir.join("volumes");
        let mut taken_over = Vec::new();
        let (records, recorded, damaged) = self.read_records(&dir);
        // A staging tmpfs no record names: a crash inside an unpublish (the record goes first).
        // It is this node's own (its state directory), so it is detached with its target binds.
        let (orphans, detached) =
            mountpoint::detach_orphan_staging(&self.staging_root(), &recorded);
        for dir in orphans {
            tracing::warn!(staging = %dir.display(), mounts = detached, "tmpfs volume of no recorded volume (unpublished during a restart) detached");
            self.audit.record(
                Event::new(EventKind::Unmount)
                    .volume(format!("staging:{}", dir.display()))
                    .detail("tmpfs volume of no recorded volume (unpublished during a restart) detached with its target"),
            );
        }
        for rec in records {
            let session = sessions.remove(&record_key(&rec.target));
            match self.recover_one(&rec, session).await {
                Ok(how) => {
                    if how == TAKEN_OVER {
                        taken_over.push(rec.volume_id.clone());
                    }
                    tracing::info!(volume_id = %rec.volume_id, target = %rec.target.display(), "{how}");
                }
                Err(err) => {
                    tracing::error!(volume_id = %rec.volume_id, target = %rec.target.display(), error = %err, "cannot recover the volume; kubelet's next republish will retry");
                }
            }
        }
        for (key, fd) in sessions {
            if damaged.contains(&key) && !crate::keeper::ended(fd.as_fd()) {
                // Its record is damaged, its connection alive: readers wait in the kernel
                // until kubelet's next publish of the target (then it is served again) or
                // its unpublish (then it is closed).
                let msg = "volume record unreadable; its live FUSE session is kept, to be served again at kubelet's next publish of the target (readers wait until then) or closed at its unpublish";
                tracing::error!(record = %key, "{msg}");
                self.audit.record(
                    Event::new(EventKind::Error)
                        .volume(format!("record:{key}"))
                        .outcome(Outcome::Failure)
                        .detail(msg),
                );
                lock(&self.unclaimed).insert(key, fd);
                continue;
            }
            // Unpublished while no process ran (its record went first): its connection is
            // closed with the last descriptor.
            drop(fd);
            if let Some(k) = &self.cfg.keeper {
                let _ = k.drop_fd(&key);
            }
            self.audit
                .record(Event::new(EventKind::Unmount).volume(key.clone()).detail(
                    "FUSE session of no recorded volume (unpublished during a restart) closed",
                ));
        }
        // Every volume is watched again: the opens that waited for this process (a kept group)
        // are answered now, by their volume's policy.
        if let Some(o) = &self.opens {
            o.ready();
        }
        self.sync_keeper(false);
        if !taken_over.is_empty() && self.opens.as_ref().is_some_and(|o| !o.inherited()) {
            // Between the previous process's last record and now nobody watched these volumes
            // (with a kept group their opens waited for this process and are recorded).
            taken_over.sort();
            self.audit.record(
                Event::new(EventKind::Gap)
                    .outcome(Outcome::Failure)
                    .detail(format!(
                        "keybroker restarted: opens of tmpfs volumes {} between {} and {} were not audited",
                        taken_over.join(", "),
                        self.audit
                            .previous_last_time()
                            .unwrap_or("the previous process's end"),
                        humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    )),
            );
        }
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The records in `dir` (a damaged one read from its copy, and audited), the keys of
    /// every record file, readable or not, and of those neither readable nor copied.
    fn read_records(
        &self,
        dir: &Path,
    ) -> (
        Vec<VolumeRecord>,
        std::collections::BTreeSet<String>,
        std::collections::BTreeSet<String>,
    ) {
        let mut records = Vec::new();
        // Every volume with a record file, readable or not: its staging mount is not an orphan.
        let mut recorded = std::collections::BTreeSet::new();
        // Records that cannot be read: their sessions are kept for kubelet's next call.
        let mut damaged = std::collections::BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    // A record half written when a process died: the complete one is beside it.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                    continue;
                };
                recorded.insert(stem.clone());
                match read_record(&path) {
                    Ok((rec, false)) => records.push(rec),
                    Ok((rec, true)) => {
                        tracing::error!(file = %path.display(), "damaged volume record; its copy is used");
                        self.audit.record(
                            Event::new(EventKind::Error)
                                .volume(rec.volume_id.clone())
                                .outcome(Outcome::Failure)
                                .detail(format!(
                                    "volume record {} damaged; taken over from its copy {}",
                                    path.display(),
                                    copy_path(&path).display()
                                )),
                        );
                        records.push(rec);
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "unreadable volume record and copy: its volume is taken over at kubelet's next publish of the target");
                        damaged.insert(stem);
                    }
                }
            }
        }
        // Copies of no record: the record went first in an unpublish a crash interrupted.
        let copies = copy_path(&dir.join("x.json"));
        if let Some(copies) = copies.parent()
            && let Ok(entries) = std::fs::read_dir(copies)
        {
            for e in entries.flatten() {
                if !dir.join(e.file_name()).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        (records, recorded, damaged)
    }

    pub(super) async fn recover_one(
        &self,
        rec: &VolumeRecord,
        session: Option<std::os::fd::OwnedFd>,
    ) -> Result<&'static str, NodeError> {
        let mut vr = request::parse(
            &rec.attributes,
            &Default::default(),
            self.cfg.default_kind,
            self.cfg.limits,
        )
        .map_err(|e| NodeError::InvalidArgument(e.0))?;
        // The type the volume was mounted with, whatever this process's default (a volume
        // without `volumeType` published before the default changed stays what it is).
        vr.kind = rec.kind;
        let grant = self
            .bindings
            .load()
            .authorize(&vr)
            .map_err(|why| self.deny(Some(&vr.pod), &rec.volume_id, why))?;
        let provider = self.provider_for(&grant, &vr, &rec.target)?;
        let staging = mountpoint::staging_dir(&self.staging_root(), &rec.target);
        let pod = vr.pod.clone();
        let adopt = match (rec.kind, &rec.fuse, session) {
            (VolumeKind::Tmpfs, _, _)
                if target_alive(&rec.target)
                    && mountpoint::mount_at(&staging)
                        .is_some_and(|m| mountpoint::is_keybroker_mount(&m)) =>
            {
                Some(Adopt::Tmpfs(TmpfsVolume::adopt(
                    &rec.target,
                    &staging,
                    Owner { uid: 0, gid: 0 },
                )))
            }
            // The descriptor must be the connection still mounted at the target.
            (VolumeKind::Fuse, Some(fr), Some(fd))
                if crate::volume::fuse::connection_id(&rec.target) == Some(fr.conn)
                    && !crate::keeper::ended(fd.as_fd()) =>
            {
                Some(Adopt::Fuse {
                    fd,
                    rec: fr.clone(),
                })
            }
            _ => {
                detach_all(&self.staging_root(), &rec.target);
                None
            }
        };
        let how = match &adopt {
            Some(Adopt::Tmpfs(_)) => Some("tmpfs volume taken over after a keybroker restart"),
            Some(Adopt::Fuse { .. }) => Some(
                "FUSE session taken over after a keybroker restart (readers waited, none saw an error)",
            ),
            None => None,
        };
        let res = self
            .mount_new(
                &rec.volume_id,
                &rec.target,
                vr,
                grant,
                provider,
                Instant::now(),
                adopt,
            )
            .await;
        if let Err(e) = res {
            if rec.kind == VolumeKind::Fuse {
                // A session nobody serves would make its readers wait forever: end it.
                detach_all(&self.staging_root(), &rec.target);
            }
            return Err(e);
        }
        if let Some(how) = how {
            self.audit.record(
                Event::new(EventKind::Mount)
                    .volume(rec.volume_id.clone())
                    .pod(pod.audit_ref())
                    .detail(how),
            );
            return Ok(if rec.kind == VolumeKind::Tmpfs {
                TAKEN_OVER
            } else {
                FUSE_TAKEN_OVER
            });
        }
        if rec.kind == VolumeKind::Fuse {
            let msg = "FUSE volume was served by the previous keybroker process and no fd keeper kept its \
                       session; remounted. Containers that already had it mounted see a dead mount \
                       (ENOTCONN) until the pod restarts";
            tracing::error!(volume_id = %rec.volume_id, pod = %pod, "{msg}");
            self.audit.record(
                Event::new(EventKind::Error)
                    .volume(rec.volume_id.clone())
                    .pod(pod.audit_ref())
                    .detail(msg)
                    .outcome(Outcome::Failure),
            );
            self.metrics.repairs.fetch_add(1, Ordering::Relaxed);
            return Ok("FUSE volume remounted after restart (running containers must restart)");
        }
        Ok("volume remounted after restart")
    }
}
