use super::*;

/// A FUSE session this process serves, as the keeper and a handover see it.
pub(super) struct Session {
    /// The name the keeper holds it under (the record's file name).
    pub(super) key: String,
    /// A duplicate of the session descriptor.
    pub(super) fd: std::os::fd::OwnedFd,
    pub(super) fs: Arc<MemFs>,
}

impl NodeService {
    /// Keeps a FUSE session's descriptor: at the keeper (so the connection outlives this
    /// process) and here (for a handover).
    pub(super) fn keep_session(&self, target: &Path, s: Session) {
        if let Some(k) = &self.cfg.keeper
            && let Err(e) = k.put(&s.key, s.fd.as_fd())
        {
            tracing::warn!(target = %target.display(), error = %e, "the fd keeper does not hold the FUSE session; the volume will not survive a crash until it does (given again when the keeper answers)");
        }
        lock(&self.sessions).insert(target.to_owned(), s);
    }

    pub(super) fn forget_session(&self, target: &Path) {
        let gone = lock(&self.sessions).remove(target);
        if let (Some(s), Some(k)) = (gone, &self.cfg.keeper)
            && let Err(e) = k.drop_fd(&s.key)
        {
            tracing::warn!(target = %target.display(), error = %e, "cannot tell the fd keeper to close a session (it closes it itself once the connection ends)");
        }
    }

    /// Gives the keeper every session it lacks (it restarted, or this process took the
    /// sessions over from another one with a keeper of its own). Returns how many were given.
    pub fn sync_keeper(&self, all: bool) -> usize {
        let Some(k) = &self.cfg.keeper else { return 0 };
        let sessions = lock(&self.sessions);
        // `announce`: this process is the keeper's node from now on (a keeper a previous node
        // started stays as long as this one lives).
        let held = match k.announce() {
            Ok(n) => n,
            Err(e) => {
                if !sessions.is_empty() {
                    tracing::warn!(error = %e, sessions = sessions.len(), "the fd keeper does not answer: FUSE volumes will not survive a crash of this process until it does");
                }
                return 0;
            }
        };
        let listeners = lock(&self.listeners);
        if !all && held >= sessions.len() + listeners.len() {
            return 0;
        }
        for (name, fd) in listeners.iter() {
            if let Err(e) = k.put(name, fd.as_fd()) {
                tracing::warn!(socket = %name, error = %e, "cannot give the fd keeper a listening socket");
            }
        }
        let mut given = 0;
        for (target, s) in sessions.iter() {
            match k.put(&s.key, s.fd.as_fd()) {
                Ok(_) => given += 1,
                Err(e) => {
                    tracing::warn!(target = %target.display(), error = %e, "cannot give the fd keeper a FUSE session")
                }
            }
        }
        if given > 0 && !all {
            tracing::warn!(
                sessions = given,
                "the fd keeper had lost FUSE sessions (restarted?); given again"
            );
        }
        given
    }

    /// Gives the fd keeper a listening socket to keep for the next process (and again to a
    /// restarted keeper, or to one that answers only later).
    pub fn keep_listener(&self, name: &str, fd: std::os::fd::OwnedFd) {
        let Some(k) = &self.cfg.keeper else {
            return;
        };
        if let Err(e) = k.put(name, fd.as_fd()) {
            tracing::warn!(socket = name, error = %e, "the fd keeper does not keep this listening socket yet; given once it answers");
        }
        lock(&self.listeners).push((name.to_owned(), fd));
    }

    /// kubelet registered the plugin with a previous process, whose registration socket this
    /// one serves now (kept by the fd keeper): the registration stands.
    pub fn registration_continues(&self) {
        tracing::info!(
            driver = keybroker_csi::DRIVER_NAME,
            "kubelet's registration of the plugin continues (its socket was kept)"
        );
        *lock(&self.kubelet) = Some(Ok(()));
    }

    /// Keeps the fd keeper in step every few seconds, until `shutdown`.
    pub fn watch_keeper(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.cfg.keeper.is_none() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || n.sync_keeper(false)).await;
            }
        });
    }
}
