//! Process shutdown and the old side of a handover: pause (no CSI call runs, FUSE sessions
//! parked between two requests), then either commit (stop everything, the newer process
//! serves) or resume (the newer process went away before it took the volumes).

use super::*;

/// A paused node: no CSI call runs or starts while it is held; FUSE sessions wait.
pub struct Paused<'a> {
    _calls: tokio::sync::RwLockWriteGuard<'a, ()>,
}

impl NodeService {
    /// Waits for the CSI calls in progress, holds new ones, and parks every FUSE session
    /// between two requests (their readers wait in the kernel). Reads so far are recorded.
    pub async fn pause(&self) -> Paused<'_> {
        let calls = self.calls.write().await;
        let left = crate::volume::fuse_mux::pause_serving(Duration::from_secs(2));
        if left > 0 {
            tracing::error!(
                sessions = left,
                "FUSE sessions still busy after 2 s; pausing anyway"
            );
        }
        for s in lock(&self.sessions).values() {
            s.fs.flush_reads(true);
        }
        Paused { _calls: calls }
    }

    /// Serves again after [`Self::pause`] (a handover rolled back).
    pub fn resume(&self, paused: Paused<'_>) {
        crate::volume::fuse_mux::resume_serving();
        drop(paused);
    }

    /// Duplicates of every FUSE session descriptor, by keeper name: those served and those
    /// kept for a damaged record.
    pub fn session_fds(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        let mut out: Vec<(String, std::os::fd::OwnedFd)> = lock(&self.sessions)
            .values()
            .filter_map(|s| Some((s.key.clone(), s.fd.try_clone().ok()?)))
            .collect();
        out.extend(
            lock(&self.unclaimed)
                .iter()
                .filter_map(|(k, fd)| Some((k.clone(), fd.try_clone().ok()?))),
        );
        // The open auditor's group, where a binding refuses readers: opens of tmpfs volumes
        // wait for the newer process (elsewhere the newer process starts a group of its own,
        // as before `readers: pod` existed).
        if self.bindings.load().enforces_readers()
            && let Some(fd) = self.opens.as_ref().and_then(|o| o.group_fd())
        {
            out.push((crate::volume::fanotify::KEPT_NAME.to_owned(), fd));
        }
        out
    }

    /// Process shutdown: stops every refresher, then every FUSE session between two requests.
    /// Mounts stay: tmpfs volumes with their content, FUSE sessions held by the fd keeper
    /// (their readers wait in the kernel until the next process serves them). With
    /// `handed_over`, a newer process has taken the volumes and says so in the audit log.
    pub async fn shutdown(&self, handed_over: bool) {
        let all: Vec<Published> = lock(&self.volumes).drain().map(|(_, p)| p).collect();
        for p in all {
            p.cancel.cancel();
            if let Ok(volume) = p.task.await {
                drop(volume);
            }
        }
        if let Some(o) = &self.opens {
            // Open windows are recorded; tmpfs volumes stay mounted, unaudited until the next
            // process takes them over (it records the gap). Before FUSE stops: the listener
            // may take a moment to stop, and FUSE readers are still served meanwhile.
            o.stop();
        }
        // From here FUSE readers wait for the next process.
        let left = crate::volume::fuse_mux::pause_serving(Duration::from_secs(2));
        if left > 0 {
            tracing::error!(
                sessions = left,
                "FUSE sessions still busy after 2 s; exiting anyway"
            );
        }
        for s in lock(&self.sessions).values() {
            s.fs.flush_reads(true);
        }
        if handed_over {
            self.audit
                .record(Event::new(EventKind::Unmount).detail(format!(
                "handed {} FUSE sessions and every tmpfs volume over to a newer keybroker process",
                lock(&self.sessions).len() + lock(&self.unclaimed).len()
            )));
        }
    }
}
