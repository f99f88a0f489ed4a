//! The upgrade handover between two node processes on one node (the DaemonSet's surge pod and
//! the pod it replaces, or two processes started by hand): the newer one asks, through a unix
//! socket in the shared state directory, and the older one stops serving (CSI first, then its
//! FUSE sessions between two requests), writes its last audit records, sends every FUSE
//! session descriptor (`SCM_RIGHTS`, as the fd keeper does) and exits. tmpfs volumes need
//! nothing sent: their mounts stay, the newer process adopts them from the records.
//!
//! The newer process asks before it opens the audit log, so the two never write it at once.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, sockopt};
use tokio_util::sync::CancellationToken;

use super::NodeService;
use crate::keeper;

/// How long the newer process waits for the older one's shutdown (its CSI grace period and
/// the last requests of its sessions come first).
pub const WAIT: Duration = Duration::from_secs(60);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// Asks a node process serving `state_dir` to hand its volumes over. `Ok(None)` when none
/// runs (no socket, or a stale one); the descriptors, by record key, when one did.
pub fn request(state_dir: &Path) -> std::io::Result<Option<BTreeMap<String, OwnedFd>>> {
    let path = socket_path(state_dir);
    if !path.exists() {
        return Ok(None);
    }
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&sock, &SocketAddrUnix::new(&path)?) {
        Ok(()) => {}
        Err(rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(WAIT))?;
    tracing::info!(socket = %path.display(), "another keybroker node process runs here; asking it to hand its volumes over");
    keeper::send(sock.as_fd(), "handover", None)?;
    let got = keeper::recv_all(sock.as_fd())?;
    Ok(Some(got))
}

/// Listens for a newer process's request; on one, hands `node` over at shutdown and cancels
/// `shutdown` (the same path as SIGTERM). The socket goes once asked, so a third process
/// finds none.
pub fn listen(
    node: Arc<NodeService>,
    state_dir: &Path,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let path = socket_path(state_dir);
    let listener = keeper::listen(&path)?;
    std::thread::Builder::new()
        .name("kb-handover".into())
        .spawn(move || {
            loop {
                let Ok(conn) =
                    rustix::net::accept_with(&listener, rustix::net::SocketFlags::CLOEXEC)
                else {
                    continue;
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
                        tracing::warn!(
                            "a newer keybroker node process asked for the volumes; handing over"
                        );
                        node.hand_over_to(conn);
                        drop(listener);
                        let _ = std::fs::remove_file(&path);
                        shutdown.cancel();
                        return;
                    }
                    _ => tracing::warn!("unreadable handover request ignored"),
                }
            }
        })?;
    Ok(())
}
