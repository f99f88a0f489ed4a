//! The fd keeper: a small process that holds a duplicate of every FUSE session descriptor of
//! the node, so a FUSE connection outlives the daemon that serves it (a crash, an OOM kill, a
//! container restart). While no server runs, the kernel queues the readers' requests; the next
//! daemon takes the descriptors back and serves them without a new INIT.
//!
//! It knows nothing of FUSE or secrets: it keeps descriptors under a name (the volume id) and
//! hands them back. The protocol is one `SOCK_SEQPACKET` message per request and reply on a
//! unix socket only its own uid may use (checked with `SO_PEERCRED`):
//!
//! | request              | reply                                                      |
//! |----------------------|------------------------------------------------------------|
//! | `put NAME` + one fd  | `ok N` (replaces a descriptor kept under NAME)              |
//! | `drop NAME`          | `ok N`                                                      |
//! | `take`               | `fd NAME` + one fd, for each kept descriptor, then `end N`  |
//! | `ping`               | `ok N`                                                      |
//! | `node`               | `ok N`; the caller (by `SO_PEERCRED` pid) is now its node   |
//! | `watch`              | `ok N`; the connection then stays open, unused, until either |
//! |                      | side ends: a node learns of the keeper's death at once       |
//! | `quit`               | `ok 0`, then the keeper closes everything and exits        |
//!
//! `N` is how many descriptors the keeper holds after the request. A descriptor whose
//! connection has ended (the volume was unmounted, or its connection aborted) polls as an
//! error; the keeper closes those before each `take` and every few seconds.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType, sockopt,
};

/// The longest message either side sends (a volume id is at most 128 bytes).
const MAX_MESSAGE: usize = 512;
/// How long a client waits for the keeper's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most `watch` connections kept open at once (the oldest goes first).
const MAX_WATCHERS: usize = 16;
/// How often the keeper looks for descriptors whose connection ended.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("the fd keeper at {path} does not answer: {error}")]
    Unreachable { path: PathBuf, error: String },
    #[error("the fd keeper at {path} refused `{request}`: {reply}")]
    Refused {
        path: PathBuf,
        request: String,
        reply: String,
    },
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one message, with `fd` attached when given.
pub(crate) fn send(
    sock: BorrowedFd<'_>,
    text: &str,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != text.len() {
        return Err(std::io::Error::other("message cut short"));
    }
    Ok(())
}

/// Receives one message and the descriptor it carries, if any. `None` at end of stream.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    // Every descriptor that came is owned here, so a surplus one is closed, never leaked.
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    if msg.bytes > buf.len() || msg.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(std::io::Error::other("message too long"));
    }
    let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
    Ok(Some((text, fds.into_iter().next())))
}

/// A name the keeper accepts: what a CSI volume id may be, no spaces or control characters.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether a kept descriptor's connection has ended (it polls as an error or hang-up).
pub fn ended(fd: BorrowedFd<'_>) -> bool {
    let mut p = [PollFd::from_borrowed_fd(fd, PollFlags::empty())];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut p, Some(&zero)) {
        Ok(_) => p[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// A client of the keeper at one socket path: each call is one short connection.
#[derive(Clone, Debug)]
pub struct KeeperClient {
    path: PathBuf,
}

impl KeeperClient {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> KeeperError {
        KeeperError::Unreachable {
            path: self.path.clone(),
            error: e.to_string(),
        }
    }

    fn connect(&self) -> Result<OwnedFd, KeeperError> {
        let sock = seqpacket().map_err(|e| self.unreachable(e))?;
        let addr = SocketAddrUnix::new(&self.path).map_err(|e| self.unreachable(e))?;
        rustix::net::connect(&sock, &addr).map_err(|e| self.unreachable(e))?;
        for t in [sockopt::Timeout::Recv, sockopt::Timeout::Send] {
            sockopt::set_socket_timeout(&sock, t, Some(CLIENT_TIMEOUT))
                .map_err(|e| self.unreachable(e))?;
        }
        Ok(sock)
    }

    /// One request, one `ok N` reply: returns N.
    fn call(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> Result<usize, KeeperError> {
        let sock = self.connect()?;
        send(sock.as_fd(), text, fd).map_err(|e| self.unreachable(e))?;
        let reply = recv(sock.as_fd())
            .map_err(|e| self.unreachable(e))?
            .map(|(t, _)| t)
            .unwrap_or_default();
        match reply.strip_prefix("ok ").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(n),
            None => Err(KeeperError::Refused {
                path: self.path.clone(),
                request: text.split(' ').next().unwrap_or_default().to_owned(),
                reply,
            }),
        }
    }

    /// How many descriptors the keeper holds (and whether it answers at all).
    pub fn ping(&self) -> Result<usize, KeeperError> {
        self.call("ping", None)
    }

    /// Like [`KeeperClient::ping`], and tells the keeper that this process is now its node
    /// (a keeper started with `--exit-with-node` exits once its node has gone and it holds
    /// nothing).
    pub fn announce(&self) -> Result<usize, KeeperError> {
        self.call("node", None)
    }

    /// Keeps a duplicate of `fd` under `name` (replacing one kept under it).
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<usize, KeeperError> {
        self.call(&format!("put {name}"), Some(fd))
    }

    pub fn drop_fd(&self, name: &str) -> Result<usize, KeeperError> {
        self.call(&format!("drop {name}"), None)
    }

    pub fn quit(&self) -> Result<usize, KeeperError> {
        self.call("quit", None)
    }

    /// A connection the keeper keeps open and never writes to again: it polls as hung up
    /// the moment the keeper exits (crash, kill, container restart), so its node can give
    /// every session to the next keeper as soon as that one listens. Returns the connection
    /// and how many descriptors the keeper held when it answered.
    pub fn watch(&self) -> Result<(OwnedFd, usize), KeeperError> {
        let sock = self.connect()?;
        send(sock.as_fd(), "watch", None).map_err(|e| self.unreachable(e))?;
        let reply = recv(sock.as_fd())
            .map_err(|e| self.unreachable(e))?
            .map(|(t, _)| t)
            .unwrap_or_default();
        match reply.strip_prefix("ok ").and_then(|n| n.parse().ok()) {
            Some(n) => Ok((sock, n)),
            None => Err(KeeperError::Refused {
                path: self.path.clone(),
                request: "watch".into(),
                reply,
            }),
        }
    }

    /// Duplicates of every descriptor the keeper holds, by name (it keeps its own).
    pub fn take(&self) -> Result<BTreeMap<String, OwnedFd>, KeeperError> {
        let sock = self.connect()?;
        send(sock.as_fd(), "take", None).map_err(|e| self.unreachable(e))?;
        let mut out = BTreeMap::new();
        loop {
            let Some((text, fd)) = recv(sock.as_fd()).map_err(|e| self.unreachable(e))? else {
                return Err(self.unreachable("the connection ended in the middle of `take`"));
            };
            if let Some(name) = text.strip_prefix("fd ")
                && let Some(fd) = fd
            {
                out.insert(name.to_owned(), fd);
            } else if text.starts_with("end ") {
                return Ok(out);
            } else {
                return Err(KeeperError::Refused {
                    path: self.path.clone(),
                    request: "take".into(),
                    reply: text,
                });
            }
        }
    }
}

/// Sends every descriptor of `fds` on `sock` as `fd NAME` messages, then `end N`.
pub fn send_all<'a>(
    sock: BorrowedFd<'_>,
    fds: impl IntoIterator<Item = (&'a str, BorrowedFd<'a>)>,
) -> std::io::Result<()> {
    let mut n = 0;
    for (name, fd) in fds {
        send(sock, &format!("fd {name}"), Some(fd))?;
        n += 1;
    }
    send(sock, &format!("end {n}"), None)
}

/// Receives what [`send_all`] sent.
pub fn recv_all(sock: BorrowedFd<'_>) -> std::io::Result<BTreeMap<String, OwnedFd>> {
    let mut out = BTreeMap::new();
    loop {
        match recv(sock)? {
            Some((text, Some(fd))) if text.starts_with("fd ") => {
                out.insert(text[3..].to_owned(), fd);
            }
            Some((text, None)) if text.starts_with("end ") => return Ok(out),
            Some((text, _)) => {
                return Err(std::io::Error::other(format!(
                    "unexpected message {text:?}"
                )));
            }
            None => return Err(std::io::Error::other("the sender went away")),
        }
    }
}

/// A listening `SOCK_SEQPACKET` socket at `path` (mode 0600, the stale file of a dead owner
/// replaced). Fails when something still answers there.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let addr = SocketAddrUnix::new(path)?;
    if path.exists() {
        let probe = seqpacket()?;
        if rustix::net::connect(&probe, &addr).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let sock = seqpacket()?;
    rustix::net::bind(&sock, &addr)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&sock, 16)?;
    Ok(sock)
}

/// The peer's uid and, when it runs in a pid namespace this process sees, its pid.
///
/// The kernel reports pid 0 for a peer outside this process's pid namespace (the DaemonSet's
/// node runs with the host's pids, its keeper without): that is no pid, not an error, so the
/// credentials are read with nix, whose pid may be 0 (rustix's may not, and fails).
fn peer(sock: BorrowedFd<'_>) -> Option<(u32, Option<rustix::process::Pid>)> {
    let cred =
        nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some((cred.uid(), rustix::process::Pid::from_raw(cred.pid())))
}

/// Whether the peer on `sock` runs as this process's uid (root, in the DaemonSet).
pub fn same_uid(sock: BorrowedFd<'_>) -> bool {
    peer(sock).is_some_and(|(uid, _)| uid == rustix::process::geteuid().as_raw())
}

/// How the keeper runs.
#[derive(Clone, Debug)]
pub struct KeeperOptions {
    pub socket: PathBuf,
    /// Exit once it has held nothing and heard from nobody for this long (a keeper a
    /// `keybroker node` started by itself; the DaemonSet's keeper container runs without).
    pub exit_when_idle: Option<Duration>,
    /// Exit as soon as its node has exited and nothing is held any more: a node run by hand,
    /// by a test harness or by systemd leaves no keeper behind once its volumes are gone.
    /// Its node is the process that started it until another announces itself (`node`, which
    /// every `keybroker node` sends when it checks on its keeper); a node that restarts thus
    /// keeps the keeper it found. While it holds sessions it stays (that is what it is for)
    /// until they end or `exit_when_idle` passes.
    pub exit_with_node: bool,
}

/// A descriptor that becomes readable when process `pid` exits (`None` when it has gone
/// already, or pidfds are not supported).
fn pidfd(pid: Option<rustix::process::Pid>) -> Option<OwnedFd> {
    let pid = pid.filter(|p| !p.is_init())?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// What one request asks of the keeper's loop.
enum Handled {
    Done,
    /// A node's `watch`: its connection stays open.
    Watch,
    Quit,
    /// A node announced itself (its pid, from `SO_PEERCRED`).
    Node(Option<rustix::process::Pid>),
}

/// Runs the keeper until `quit` (or idle, when asked to).
pub fn run(opts: &KeeperOptions) -> std::io::Result<()> {
    let listener = listen(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), "fd keeper listening");
    let mut kept: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let mut last_heard = Instant::now();
    let mut last_prune = Instant::now();
    // Its node, watched while it lives; `None` once it has exited (or when not asked to).
    let mut node = if opts.exit_with_node {
        let fd = pidfd(rustix::process::getppid());
        if fd.is_none() {
            tracing::info!("fd keeper: the node that started it has exited already");
        }
        fd
    } else {
        None
    };
    let mut node_gone = opts.exit_with_node && node.is_none();
    // Nodes' `watch` connections: kept open so they see this process end.
    let mut watchers: Vec<OwnedFd> = Vec::new();
    let res = loop {
        if node_gone && kept.is_empty() {
            tracing::info!("fd keeper: its node has exited and nothing is held; exiting");
            break Ok(());
        }
        let mut p = vec![PollFd::new(&listener, PollFlags::IN)];
        let first_watcher = 1 + usize::from(node.is_some());
        if let Some(fd) = &node {
            p.push(PollFd::new(fd, PollFlags::IN));
        }
        p.extend(watchers.iter().map(|w| PollFd::new(w, PollFlags::IN)));
        let wait = rustix::event::Timespec {
            tv_sec: PRUNE_EVERY.as_secs() as i64,
            tv_nsec: 0,
        };
        match poll(&mut p, Some(&wait)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => break Err(e.into()),
        }
        let listener_ready = p[0].revents().contains(PollFlags::IN);
        // A watcher that hung up (its node exited) or wrote (it is never asked to): closed.
        let ended: Vec<usize> = p[first_watcher..]
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.revents().is_empty())
            .map(|(i, _)| i)
            .collect();
        let node_ended = node.is_some() && !p[1].revents().is_empty();
        drop(p);
        for i in ended.into_iter().rev() {
            watchers.swap_remove(i);
        }
        if node_ended {
            node = None;
            node_gone = true;
            prune(&mut kept);
            tracing::info!(descriptors = kept.len(), "fd keeper: its node has exited");
            continue;
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            prune(&mut kept);
            last_prune = Instant::now();
        }
        if !listener_ready {
            if let Some(idle) = opts.exit_when_idle
                && kept.is_empty()
                && last_heard.elapsed() >= idle
            {
                tracing::info!("fd keeper idle and empty; exiting");
                break Ok(());
            }
            continue;
        }
        let Ok(conn) = rustix::net::accept_with(&listener, rustix::net::SocketFlags::CLOEXEC)
        else {
            continue;
        };
        last_heard = Instant::now();
        if !same_uid(conn.as_fd()) {
            tracing::warn!("fd keeper: refused a client of another uid");
            let _ = send(
                conn.as_fd(),
                "err only the keeper's own uid may connect",
                None,
            );
            continue;
        }
        let _ = sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(CLIENT_TIMEOUT));
        let _ = sockopt::set_socket_timeout(&conn, sockopt::Timeout::Send, Some(CLIENT_TIMEOUT));
        match handle(conn.as_fd(), &mut kept) {
            Handled::Done => {}
            Handled::Watch => {
                // One or two nodes watch at a time (two during a handover); a client that
                // leaks connections cannot grow the poll set without bound.
                if watchers.len() >= MAX_WATCHERS {
                    watchers.remove(0);
                }
                watchers.push(conn);
            }
            Handled::Quit => break Ok(()),
            Handled::Node(pid) if opts.exit_with_node => {
                if let Some(fd) = pidfd(pid) {
                    node = Some(fd);
                    node_gone = false;
                }
            }
            Handled::Node(_) => {}
        }
    };
    let _ = std::fs::remove_file(&opts.socket);
    res
}

/// Closes descriptors whose connection has ended.
fn prune(kept: &mut BTreeMap<String, OwnedFd>) {
    kept.retain(|name, fd| {
        let gone = ended(fd.as_fd());
        if gone {
            tracing::info!(volume_id = %name, "fd keeper: connection ended; descriptor closed");
        }
        !gone
    });
}

/// Answers one request.
fn handle(conn: BorrowedFd<'_>, kept: &mut BTreeMap<String, OwnedFd>) -> Handled {
    let (text, fd) = match recv(conn) {
        Ok(Some(m)) => m,
        Ok(None) => return Handled::Done,
        Err(e) => {
            tracing::warn!(error = %e, "fd keeper: unreadable request");
            return Handled::Done;
        }
    };
    let mut handled = Handled::Done;
    let (verb, arg) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let reply = match (verb, fd) {
        ("put", Some(fd)) if valid_name(arg) => {
            kept.insert(arg.to_owned(), fd);
            tracing::debug!(volume_id = %arg, "fd keeper: descriptor kept");
            format!("ok {}", kept.len())
        }
        ("drop", None) if valid_name(arg) => {
            kept.remove(arg);
            format!("ok {}", kept.len())
        }
        ("ping", None) => format!("ok {}", kept.len()),
        ("watch", None) => {
            handled = Handled::Watch;
            format!("ok {}", kept.len())
        }
        ("node", None) => {
            handled = Handled::Node(peer(conn).and_then(|(_, pid)| pid));
            format!("ok {}", kept.len())
        }
        ("take", None) => {
            prune(kept);
            if let Err(e) = send_all(conn, kept.iter().map(|(n, f)| (n.as_str(), f.as_fd()))) {
                tracing::warn!(error = %e, "fd keeper: cannot hand the descriptors back");
            }
            return Handled::Done;
        }
        ("quit", None) => {
            let _ = send(conn, "ok 0", None);
            tracing::info!(descriptors = kept.len(), "fd keeper: asked to quit");
            return Handled::Quit;
        }
        _ => "err expected `put NAME` with one descriptor, `drop NAME`, `take`, `ping`, `node`, `watch` or `quit`"
            .to_owned(),
    };
    if let Err(e) = send(conn, &reply, None) {
        tracing::warn!(error = %e, "fd keeper: cannot answer");
    }
    handled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_reader() -> (OwnedFd, OwnedFd) {
        let (r, w) = rustix::pipe::pipe().unwrap();
        (r, w)
    }

    #[test]
    fn keeps_hands_back_drops_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("keeper.sock");
        let opts = KeeperOptions {
            socket: sock.clone(),
            exit_when_idle: None,
            exit_with_node: false,
        };
        let keeper = std::thread::spawn(move || run(&opts));
        let c = KeeperClient::new(&sock);
        let started = Instant::now();
        while c.ping().is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "keeper did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // A second keeper on the same socket refuses to start.
        assert!(listen(&sock).is_err());
        let (r1, w1) = pipe_reader();
        let (r2, w2) = pipe_reader();
        assert_eq!(c.put("vol-a", r1.as_fd()).unwrap(), 1);
        assert_eq!(c.put("vol-b", r2.as_fd()).unwrap(), 2);
        assert_eq!(c.put("vol-b", r2.as_fd()).unwrap(), 2, "put replaces");
        assert!(matches!(
            c.call("put has space", Some(r1.as_fd())),
            Err(KeeperError::Refused { .. })
        ));
        // What comes back is the same pipe: a byte written at our end is read from it.
        let back = c.take().unwrap();
        assert_eq!(back.keys().collect::<Vec<_>>(), ["vol-a", "vol-b"]);
        rustix::io::write(&w1, b"x").unwrap();
        let mut b = [0u8; 1];
        rustix::io::read(&back["vol-a"], &mut b).unwrap();
        assert_eq!(&b, b"x");
        assert_eq!(c.drop_fd("vol-a").unwrap(), 1);
        // A pipe whose writer is gone polls as hang-up: pruned at the next take.
        drop((w2, r2, back));
        assert!(c.take().unwrap().is_empty());
        assert_eq!(c.ping().unwrap(), 0);
        c.quit().unwrap();
        keeper.join().unwrap().unwrap();
        assert!(!sock.exists(), "the socket goes with the keeper");
        drop((r1, w1));
    }
}
