use super::*;

impl NodeService {
    /// Process shutdown: stops every refresher, then every FUSE session between two requests.
    /// Mounts stay: tmpfs volumes with their content, FUSE sessions held by the fd keeper
    /// (their readers wait in the kernel until the next process serves them). A newer
    /// process that asked for a handover gets the sessions now.
    pub async fn shutdown(&self) {
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
        let left = crate::volume::fuse_mux::stop_serving(Duration::from_secs(2));
        if left > 0 {
            tracing::error!(
                sessions = left,
                "FUSE sessions still busy after 2 s; exiting anyway"
            );
        }
        for s in lock(&self.sessions).values() {
            s.fs.flush_reads(true);
        }
        if lock(&self.handover).is_some() {
            self.audit
                .record(Event::new(EventKind::Unmount).detail(format!(
                "handing {} FUSE sessions and every tmpfs volume over to a newer keybroker process",
                lock(&self.sessions).len()
            )));
        }
    }

    /// Sends the sessions to the process that asked for a handover (after [`Self::shutdown`]
    /// and the audit log's last flush). True when one was asked for.
    pub fn complete_handover(&self) -> bool {
        let Some(conn) = lock(&self.handover).take() else {
            return false;
        };
        let sessions = lock(&self.sessions);
        let res = crate::keeper::send_all(
            conn.as_fd(),
            sessions.values().map(|s| (s.key.as_str(), s.fd.as_fd())),
        );
        match res {
            Ok(()) => tracing::info!(sessions = sessions.len(), "volumes handed over"),
            Err(e) => {
                tracing::error!(error = %e, "the handover failed; the fd keeper still holds the sessions")
            }
        }
        true
    }

    /// Called by the handover listener: a newer process takes over at this one's shutdown.
    pub fn hand_over_to(&self, conn: std::os::fd::OwnedFd) {
        *lock(&self.handover) = Some(conn);
    }
}
