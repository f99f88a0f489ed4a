//! The node's side of the fd keeper: every FUSE session is given to it as soon as it is
//! mounted, and to a keeper that comes back (restarted) at once: a `watch` connection tells
//! this process the moment its keeper ends, and inotify on the socket's directory the moment a
//! new one binds. Until a keeper holds every session, `/readyz` says not ready and why.

use super::*;

/// A FUSE session this process serves, as the keeper and a handover see it.
pub(super) struct Session {
    /// The name the keeper holds it under (the record's file name).
    pub(super) key: String,
    /// A duplicate of the session descriptor.
    pub(super) fd: std::os::fd::OwnedFd,
    pub(super) fs: Arc<MemFs>,
}

/// What the node knows of its keeper.
#[derive(Default)]
pub(super) struct KeeperState {
    /// Sessions (by key) the keeper answered `ok` for since it last (re)appeared.
    pub(super) held: std::collections::HashSet<String>,
    /// Why the keeper holds nothing now (it does not answer, or none is configured).
    pub(super) down: Option<String>,
}

/// How long the watcher waits for a sign of a new keeper before trying anyway.
const KEEPER_RETRY: Duration = Duration::from_secs(1);

impl NodeService {
    /// Keeps a FUSE session's descriptor: here (for a handover, and to give it to a keeper
    /// that comes back) and at the keeper (so the connection outlives this process).
    pub(super) fn keep_session(&self, target: &Path, s: Session) {
        let key = s.key.clone();
        let put = self.cfg.keeper.as_ref().map(|k| k.put(&key, s.fd.as_fd()));
        // Before the put is judged: a keeper that comes back in between finds it here.
        lock(&self.sessions).insert(target.to_owned(), s);
        match put {
            Some(Ok(_)) => {
                lock(&self.keeper_state).held.insert(key);
            }
            Some(Err(e)) => {
                tracing::warn!(target = %target.display(), error = %e, "the fd keeper does not hold the FUSE session; the volume will not survive a crash until it does (given to the keeper as soon as it answers)");
            }
            None => {}
        }
    }

    pub(super) fn forget_session(&self, target: &Path) {
        let gone = lock(&self.sessions).remove(target);
        if let Some(s) = gone {
            lock(&self.keeper_state).held.remove(&s.key);
            if let Some(k) = &self.cfg.keeper
                && let Err(e) = k.drop_fd(&s.key)
            {
                tracing::warn!(target = %target.display(), error = %e, "cannot tell the fd keeper to close a session (it closes it itself once the connection ends)");
            }
        }
    }

    /// FUSE sessions (served, or kept for a damaged record) the keeper does not hold: each is
    /// a volume a crash of this process would break.
    pub fn unkept_sessions(&self) -> usize {
        let state = lock(&self.keeper_state);
        let sessions = lock(&self.sessions);
        let served = sessions
            .values()
            .filter(|s| !state.held.contains(&s.key))
            .count();
        let unclaimed = lock(&self.unclaimed)
            .keys()
            .filter(|k| !state.held.contains(*k))
            .count();
        served + unclaimed
    }

    /// Why FUSE sessions are not all kept, for `/readyz` (`None`: every one is).
    pub(super) fn keeper_not_ready(&self) -> Option<String> {
        let n = self.unkept_sessions();
        if n == 0 {
            return None;
        }
        let why = match (&self.cfg.keeper, &lock(&self.keeper_state).down) {
            (None, _) => "this node runs with --fd-keeper off".to_owned(),
            (Some(_), Some(e)) => e.clone(),
            (Some(k), None) => format!(
                "the fd keeper at {} refused some of them (see the log)",
                k.path().display()
            ),
        };
        Some(format!(
            "{n} FUSE sessions are not held by an fd keeper ({why}): a restart of keybroker now would break their containers (ENOTCONN); start the keeper (the chart's keybroker-fd-keeper DaemonSet) and they are given to it at once"
        ))
    }

    /// Gives the keeper every session it may lack (it restarted, or this process took the
    /// sessions over) and the listening sockets; tells it this process is its node. Returns
    /// how many sessions were given.
    pub fn sync_keeper(&self, log_given: bool) -> usize {
        let Some(k) = &self.cfg.keeper else { return 0 };
        if let Err(e) = k.announce() {
            self.keeper_down(&e.to_string());
            return 0;
        }
        for (name, fd) in lock(&self.listeners).iter() {
            if let Err(e) = k.put(name, fd.as_fd()) {
                tracing::warn!(socket = %name, error = %e, "cannot give the fd keeper a listening socket");
            }
        }
        let mut held = std::collections::HashSet::new();
        {
            let sessions = lock(&self.sessions);
            let unclaimed = lock(&self.unclaimed);
            let all = sessions
                .iter()
                .map(|(t, s)| (t.display().to_string(), s.key.as_str(), s.fd.as_fd()))
                .chain(
                    unclaimed
                        .iter()
                        .map(|(key, fd)| (format!("record {key}"), key.as_str(), fd.as_fd())),
                );
            for (what, key, fd) in all {
                match k.put(key, fd) {
                    Ok(_) => {
                        held.insert(key.to_owned());
                    }
                    Err(e) => {
                        tracing::warn!(target = %what, error = %e, "cannot give the fd keeper a FUSE session")
                    }
                }
            }
        }
        let given = held.len();
        // Added to, not replaced: a session mounted meanwhile was given by its publish.
        let mut state = lock(&self.keeper_state);
        state.held.extend(held);
        state.down = None;
        drop(state);
        self.metrics
            .keeper_syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if log_given && given > 0 {
            tracing::warn!(
                sessions = given,
                keeper = %k.path().display(),
                "a new fd keeper answers; every FUSE session given to it"
            );
        }
        given
    }

    fn keeper_down(&self, error: &str) {
        let mut state = lock(&self.keeper_state);
        state.held.clear();
        let why = format!(
            "the fd keeper at {} does not answer: {error}",
            self.cfg
                .keeper
                .as_ref()
                .map(|k| k.path().display().to_string())
                .unwrap_or_default()
        );
        if state.down.as_ref() != Some(&why) {
            tracing::error!(
                "{why}; FUSE volumes will not survive a crash of this process until it is back"
            );
        }
        state.down = Some(why);
    }

    /// The open auditor's fanotify group is kept by the fd keeper while some binding refuses
    /// readers (`readers: pod`): the opens of marked volumes then wait for the next process
    /// instead of being allowed while none runs. Otherwise it is not kept (one an earlier
    /// process left is released): a crash then lets opens through, unaudited, as a crash of a
    /// node without the policy always did, and never refuses one. Called at start and after
    /// every bindings reload.
    pub fn sync_open_group(&self) {
        let name = crate::volume::fanotify::KEPT_NAME;
        let want = self.bindings.load().enforces_readers();
        let kept = lock(&self.listeners).iter().any(|(n, _)| n == name);
        if want && !kept {
            if let Some(fd) = self.open_group_fd() {
                self.keep_listener(name, fd);
            }
        } else if !want {
            lock(&self.listeners).retain(|(n, _)| n != name);
            if let Some(k) = &self.cfg.keeper {
                let _ = k.drop_fd(name);
            }
        }
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

    /// Watches the fd keeper until `shutdown`: while one answers, a `watch` connection to it
    /// hangs up the moment it ends; then the directory of its socket is watched until a new
    /// keeper binds there, and every session is given to it at once.
    pub fn watch_keeper(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(k) = self.cfg.keeper.clone() else {
            *lock(&self.keeper_state) = KeeperState {
                held: Default::default(),
                down: Some("none is configured".into()),
            };
            return;
        };
        let node = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kb-keeper-watch".into())
            .spawn(move || node.keeper_watch_loop(&k, &shutdown));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch the fd keeper: a restarted keeper gets the sessions only at the next publish");
        }
    }

    fn keeper_watch_loop(&self, k: &crate::keeper::KeeperClient, shutdown: &CancellationToken) {
        let mut first = true;
        while !shutdown.is_cancelled() {
            let watch = match k.watch() {
                Ok((conn, _)) => conn,
                Err(crate::keeper::KeeperError::Refused { .. }) => {
                    // A keeper older than `watch`: checked every second instead.
                    self.sync_keeper(!first);
                    first = false;
                    std::thread::sleep(KEEPER_RETRY);
                    continue;
                }
                Err(e) => {
                    self.keeper_down(&e.to_string());
                    wait_for_socket(k, shutdown);
                    continue;
                }
            };
            // Every session, whatever the keeper says it holds: it may be a new keeper, or
            // the one a previous process gave them to (a put replaces).
            self.sync_keeper(!first);
            first = false;
            // Until the keeper ends (its end of the connection closes) or this process stops.
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                let mut p = [rustix::event::PollFd::new(
                    &watch,
                    rustix::event::PollFlags::IN,
                )];
                let wait = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 250_000_000,
                };
                match rustix::event::poll(&mut p, Some(&wait)) {
                    Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                    _ => break,
                }
            }
            self.keeper_down("it exited (its watch connection hung up)");
        }
    }
}

/// Returns once a keeper answers at `k`'s socket, once something is created in its
/// directory (a new keeper binding it: it listens microseconds later, so the next few
/// milliseconds are tried), after [`KEEPER_RETRY`], or at `shutdown`.
fn wait_for_socket(k: &crate::keeper::KeeperClient, shutdown: &CancellationToken) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let dir = k.path().parent().unwrap_or(Path::new("/"));
    let notified = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .ok()
        .filter(|i| {
            i.add_watch(
                dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
            )
            .is_ok()
        });
    // Watched first, then tried: a keeper that bound in between is not missed.
    if k.ping().is_ok() {
        return;
    }
    let started = Instant::now();
    let Some(i) = &notified else {
        std::thread::sleep(Duration::from_millis(50));
        return;
    };
    let mut p = [rustix::event::PollFd::new(i, rustix::event::PollFlags::IN)];
    loop {
        if shutdown.is_cancelled() || started.elapsed() >= KEEPER_RETRY {
            return;
        }
        let wait = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        if matches!(rustix::event::poll(&mut p, Some(&wait)), Ok(n) if n > 0) {
            break;
        }
    }
    let woken = Instant::now();
    while woken.elapsed() < Duration::from_millis(200) && !shutdown.is_cancelled() {
        if k.ping().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
