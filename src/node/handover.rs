//! The upgrade handover between two node processes on one node (the DaemonSet's surge pod and
//! the pod it replaces, or two processes started by hand), through a unix socket in the
//! shared state directory. It is confirmed before the older side lets go, and a death at any
//! point leaves exactly one process serving:
//!
//! | step | newer process (N)          | older process (O)                                    |
//! |------|----------------------------|------------------------------------------------------|
//! | 1    | `handover`                 | pauses: CSI calls wait, FUSE sessions parked between two requests |
//! | 2    |                            | `fd KEY` + descriptor for every FUSE session, `end N` |
//! | 3    | `took N`                   | commits: refreshers and the open auditor stop, last audit records written, the log sealed |
//! | 4    |                            | `done`, socket removed, exits (or waits for SIGTERM)  |
//! | 5    | opens the audit log, serves the sessions (adopted without INIT) and the tmpfs volumes |
//!
//! - N dies before `took` (steps 1–3): O's connection ends without it; O **rolls back**
//!   (serves again, readers waited the pause) and a restarted N asks again.
//! - N dies after `took`: O has committed; the fd keeper holds every session (O gave them as
//!   they were mounted), so the restarted N takes them from the keeper, as after a crash.
//! - O dies at any step: N's connection ends; before `end` N asks again (nobody answers)
//!   and takes the sessions from the keeper; after `end` it serves what it got.
//! - O cannot complete (N silent for [`WAIT`]): O sends `rollback` and serves on; N, on
//!   `rollback` where it expected `done`, asks again.
//!
//! N asks before it opens the audit log and opens it only after `done` (or O's death), so the
//! two never write it at once. tmpfs volumes need nothing sent: their mounts stay, N adopts
//! them from the records.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, sockopt};

use super::NodeService;
use crate::audit::{Event, EventKind, Outcome as AuditOutcome};
use crate::keeper;

/// How long either side waits for the other's next step (the older side's pause waits for
/// in-flight CSI calls first).
pub const WAIT: Duration = Duration::from_secs(60);
/// How often the newer process asks again when the older one rolled back or went away.
const ATTEMPTS: usize = 3;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// What asking brought.
enum Asked {
    /// No process listens (no socket, or a stale one).
    Nobody,
    /// The older process committed (or died after sending): these are the sessions.
    Took(BTreeMap<String, OwnedFd>),
    /// It rolled back, or died before sending everything: ask again.
    Again(String),
}

/// Asks a node process serving `state_dir` to hand its volumes over. `Ok(None)` when none
/// runs (then the fd keeper has the sessions); the descriptors, by record key, when one
/// handed over. An error when the older process is alive and would not let go.
pub fn request(state_dir: &Path) -> std::io::Result<Option<BTreeMap<String, OwnedFd>>> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        match ask(state_dir)? {
            Asked::Nobody => return Ok(None),
            Asked::Took(got) => return Ok(Some(got)),
            Asked::Again(why) => {
                tracing::warn!(attempt, reason = %why, "the handover did not complete; asking again");
                last = why;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(std::io::Error::other(format!(
        "the keybroker process serving this node did not hand over after {ATTEMPTS} attempts: {last}"
    )))
}

fn ask(state_dir: &Path) -> std::io::Result<Asked> {
    let path = socket_path(state_dir);
    if !path.exists() {
        return Ok(Asked::Nobody);
    }
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&sock, &SocketAddrUnix::new(&path)?) {
        Ok(()) => {}
        Err(rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT) => {
            return Ok(Asked::Nobody);
        }
        Err(e) => return Err(e.into()),
    }
    sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(WAIT))?;
    tracing::info!(socket = %path.display(), "another keybroker node process runs here; asking it to hand its volumes over");
    #[cfg(feature = "test-controller")]
    test_stall("connected");
    // Connected, but it may die before it reads the request (killed between our connect
    // and its accept): the send then fails with a reset or a broken pipe. Asking again
    // finds nobody listening, and the keeper has the sessions.
    if let Err(e) = keeper::send(sock.as_fd(), "handover", None) {
        if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)) {
            return Ok(Asked::Again(format!(
                "it went away before reading the request: {e}"
            )));
        }
        return Err(e);
    }
    let got = match keeper::recv_all(sock.as_fd()) {
        Ok(got) => got,
        // It died (or rolled back) before sending everything: if it died, nobody answers
        // the next attempt and the keeper has the sessions.
        Err(e) => return Ok(Asked::Again(format!("while receiving the sessions: {e}"))),
    };
    // Confirmed before anything else: from here the older process lets go.
    let _ = keeper::send(sock.as_fd(), &format!("took {}", got.len()), None);
    match keeper::recv(sock.as_fd()) {
        Ok(Some((text, _))) if text == "done" => Ok(Asked::Took(got)),
        Ok(Some((text, _))) if text == "rollback" => Ok(Asked::Again(
            "it rolled back (it waited too long for this process)".into(),
        )),
        // It ended without a word: it died after sending the sessions, and serves nothing.
        Ok(None) => {
            tracing::warn!(
                "the older process ended before confirming the handover; serving the sessions it sent"
            );
            Ok(Asked::Took(got))
        }
        // Dead before it read `took`: its end resets the connection instead. The same.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            tracing::warn!(
                "the older process died before it read the confirmation; serving the sessions it sent"
            );
            Ok(Asked::Took(got))
        }
        Ok(Some((text, _))) => Err(std::io::Error::other(format!(
            "unexpected handover reply {text:?}"
        ))),
        Err(e) => Err(std::io::Error::other(format!(
            "the older process did not finish the handover within {WAIT:?}: {e}"
        ))),
    }
}

/// The older side's listener: each accepted request (a connection whose first message is
/// `handover`, from this uid) is passed to the daemon, which runs [`hand_over`].
pub struct Listener {
    sock: Arc<OwnedFd>,
    path: PathBuf,
    pub requests: tokio::sync::mpsc::Receiver<OwnedFd>,
}

impl Listener {
    /// No further request is accepted (a pending one is refused) and the socket file goes,
    /// so the next process finds none.
    pub fn close(&self) {
        let _ = rustix::net::shutdown(&*self.sock, rustix::net::Shutdown::Both);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens for a newer process's requests at `state_dir`.
pub fn listen(state_dir: &Path) -> std::io::Result<Listener> {
    let path = socket_path(state_dir);
    let sock = Arc::new(keeper::listen(&path)?);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let listener = sock.clone();
    std::thread::Builder::new()
        .name("kb-handover".into())
        .spawn(move || {
            loop {
                let conn =
                    match rustix::net::accept_with(&*listener, rustix::net::SocketFlags::CLOEXEC) {
                        Ok(c) => c,
                        Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                        // Closed ([`Listener::close`]).
                        Err(_) => return,
                    };
                if !keeper::same_uid(conn.as_fd()) {
                    tracing::warn!("handover request from another uid refused");
                    continue;
                }
                let _ = sockopt::set_socket_timeout(
                    &conn,
                    sockopt::Timeout::Recv,
                    Some(Duration::from_secs(5)),
                );
                match keeper::recv(conn.as_fd()) {
                    Ok(Some((text, None))) if text == "handover" => {
                        if tx.blocking_send(conn).is_err() {
                            return;
                        }
                    }
                    _ => tracing::warn!("unreadable handover request ignored"),
                }
            }
        })?;
    Ok(Listener {
        sock,
        path,
        requests: rx,
    })
}

/// How a handover ended on the older side.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The newer process took the volumes; this one has stopped everything and must exit.
    Committed,
    /// The newer process went away first; this one serves on.
    RolledBack,
}

/// The older side of one handover on `conn` (see the module's table).
pub async fn hand_over(node: &Arc<NodeService>, listener: &Listener, conn: OwnedFd) -> Outcome {
    tracing::warn!("a newer keybroker node process asked for the volumes; pausing to hand over");
    let paused = node.pause().await;
    let sessions = node.session_fds();
    let n = sessions.len();
    let conn = Arc::new(conn);
    let c = conn.clone();
    let took = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        sockopt::set_socket_timeout(&*c, sockopt::Timeout::Recv, Some(WAIT))?;
        sockopt::set_socket_timeout(&*c, sockopt::Timeout::Send, Some(WAIT))?;
        #[cfg(feature = "test-controller")]
        test_stall("send");
        keeper::send_all(
            c.as_fd(),
            sessions.iter().map(|(k, fd)| (k.as_str(), fd.as_fd())),
        )?;
        match keeper::recv(c.as_fd())? {
            Some((text, None)) if text == format!("took {}", sessions.len()) => Ok(()),
            Some((text, _)) => Err(std::io::Error::other(format!("unexpected reply {text:?}"))),
            None => Err(std::io::Error::other(
                "the newer process ended before it took the volumes",
            )),
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    if let Err(e) = took {
        let _ = keeper::send(conn.as_fd(), "rollback", None);
        node.resume(paused);
        node.metrics
            .handovers_rolled_back
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(error = %e, "the handover did not complete; serving on (readers waited, none saw an error)");
        node.audit().record(
            Event::new(EventKind::Error)
                .outcome(AuditOutcome::Failure)
                .detail(format!(
                    "handover to a newer keybroker process rolled back ({e}); this process serves on"
                )),
        );
        return Outcome::RolledBack;
    }
    // Committed: nothing of this process may touch the volumes or the log any more.
    #[cfg(feature = "test-controller")]
    tokio::task::spawn_blocking(|| test_stall("commit"))
        .await
        .ok();
    listener.close();
    node.shutdown(true).await;
    node.audit().seal();
    // Held until the process ends: a CSI call that waited for the handover is never run
    // here (its connection ends with this process and kubelet retries it with the new one).
    std::mem::forget(paused);
    if let Err(e) = keeper::send(conn.as_fd(), "done", None) {
        tracing::warn!(error = %e, "the newer process went away after taking the volumes (its next start takes them from the fd keeper)");
    }
    tracing::info!(sessions = n, "volumes handed over");
    Outcome::Committed
}

/// TEST ONLY: stalls a side at `stage` (the newer side's `connected`: before it sends its
/// request; the older side's `send`: paused, before the sessions go; `commit`: after `took`,
/// before it lets go) for the milliseconds the file named by
/// `KEYBROKER_TEST_HANDOVER_STALL_FILE` gives for it (`send 300`), so a test can kill either
/// process at that point.
#[cfg(feature = "test-controller")]
fn test_stall(stage: &str) {
    let Some(file) = std::env::var_os("KEYBROKER_TEST_HANDOVER_STALL_FILE") else {
        return;
    };
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let ms = text
        .split_once(' ')
        .filter(|(s, _)| *s == stage)
        .and_then(|(_, ms)| ms.trim().parse::<u64>().ok());
    if let Some(ms) = ms {
        tracing::warn!(
            stage,
            ms,
            "TEST: handover stalled (KEYBROKER_TEST_HANDOVER_STALL_FILE)"
        );
        std::thread::sleep(Duration::from_millis(ms));
    }
}
