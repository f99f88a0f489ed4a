//! FUSE sessions served on the async runtime: each volume's `/dev/fuse` connection is a
//! non-blocking descriptor registered with tokio, and one small task per session reads a
//! request, answers it from [`MemFs`] and waits for the next. No thread per volume and no
//! per-session read buffer: a request is read into the worker thread's one 8 KiB buffer (the
//! kernel's minimum, enough because nothing is ever written: `max_write` is 4 KiB) and
//! answered before the task yields. So the node's threads and memory grow with its runtime,
//! not with its volumes.
//!
//! The protocol is `fusewire`; the filesystem, its audit and its errno mapping are shared with
//! the `fuser` adapter ([`super::fuse`]). Mounting is the `mount(2)` a root process does itself
//! (`fd=`, `rootmode=`, `user_id=`, `group_id=`, `allow_other`, `default_permissions`).
//!
//! A session does not depend on the process that mounted it: it is a descriptor and the state
//! of [`MemFs`]. [`MuxVolume::session_fd`] gives the descriptor to whoever must keep the
//! connection alive across a restart (the fd keeper, `crate::keeper`); [`MuxVolume::adopt`]
//! serves such a descriptor in the next process without a second INIT: the protocol minor is
//! the one recorded at mount, requests the dead server had read are queued again
//! (`FUSE_NOTIFY_RESEND`), and the previous process's inodes answer through
//! [`MemFs::restore`]. [`pause_serving`] parks every session between two requests, so a
//! process that exits or hands over never leaves one half answered; [`resume_serving`] serves
//! them again when a handover is rolled back.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use tokio::io::unix::AsyncFd;

use super::content::RenderedFile;
use super::fuse::{FuseOptions, errno};
use super::fusewire::{self as wire, InHeader, Reply, WireAttr, op};
use super::memfs::{Attr, Caller, MemFs, NodeKind, ROOT_INO, read_range};
use super::{Volume, VolumeError, VolumeKind};

const TTL: (u64, u32) = (24 * 3600, 0);

/// The sessions' own runtime (two threads), apart from the daemon's: the daemon's tasks may
/// touch its own mounts with blocking calls (a `stat` of a target), which must never wait on
/// a worker that is itself blocked in such a call.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .thread_name("kb-fuse")
            .enable_all()
            .build()
            .expect("the FUSE runtime starts (threads can be created)")
    })
}

/// Whether sessions are paused (a handover in progress, or the process exiting); see
/// [`pause_serving`].
fn paused() -> &'static tokio::sync::watch::Sender<bool> {
    static PAUSED: std::sync::OnceLock<tokio::sync::watch::Sender<bool>> =
        std::sync::OnceLock::new();
    PAUSED.get_or_init(|| tokio::sync::watch::Sender::new(false))
}

/// Sessions whose task is serving (not parked by a pause, not ended).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Pauses every session of this process between two requests and waits (at most `wait`)
/// until none is in the middle of one. The mounts and descriptors stay: readers wait in the
/// kernel until this process resumes ([`resume_serving`], a handover rolled back) or another
/// process (holding the descriptors through the keeper or a handover) serves them. Returns
/// how many sessions were still serving when the wait ended (0 normally).
pub fn pause_serving(wait: Duration) -> usize {
    paused().send_replace(true);
    let started = std::time::Instant::now();
    while RUNNING.load(Ordering::Acquire) > 0 && started.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(1));
    }
    RUNNING.load(Ordering::Acquire)
}

/// Serves every paused session again (a handover that did not complete).
pub fn resume_serving() {
    paused().send_replace(false);
}

thread_local! {
    /// One request buffer and one reply buffer per worker thread: a request is read, answered
    /// and written back without yielding in between.
    static BUFS: RefCell<(Vec<u8>, Reply)> = RefCell::new((vec![0u8; wire::READ_BUFFER], Reply::default()));
}

/// How a session answers, fixed at mount.
#[derive(Clone, Copy)]
struct Session {
    ttl: (u64, u32),
    open_flags: u32,
}

struct Conn {
    dev: AsyncFd<File>,
    fs: Arc<MemFs>,
    session: Session,
    /// The protocol minor version agreed at INIT (0 until then).
    minor: AtomicU32,
}

/// A FUSE volume served by a task on the runtime.
pub struct MuxVolume {
    conn: Arc<Conn>,
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
    linger: Duration,
}

fn mount_err(dir: &Path, e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Mount {
        kind: VolumeKind::Fuse,
        path: dir.to_owned(),
        error: e.to_string(),
    }
}

impl MuxVolume {
    /// Mounts `fs` at `dir` and starts serving it on the sessions' runtime. Needs root.
    pub fn mount(dir: &Path, fs: Arc<MemFs>, opts: &FuseOptions) -> Result<Self, VolumeError> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| mount_err(dir, format!("cannot open /dev/fuse: {e}")))?;
        let flags = MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_NOATIME;
        let mut data = format!(
            "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
            dev.as_raw_fd(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        );
        if opts.allow_other {
            data.push_str(",allow_other");
        }
        nix::mount::mount(
            Some("keybroker"),
            dir,
            Some("fuse.keybroker"),
            flags,
            Some(data.as_str()),
        )
        .map_err(|e| mount_err(dir, e))?;
        let session = session_for(opts);
        let registered = {
            let _in_rt = runtime().enter();
            Self::serve(dev, fs, session, 0)
        };
        let v = match registered {
            Ok(conn) => Self {
                task: spawn(conn.clone()),
                conn,
                dir: dir.to_owned(),
                linger: opts.linger,
            },
            Err(e) => {
                let _ = nix::mount::umount2(dir, MntFlags::MNT_DETACH);
                return Err(mount_err(dir, e));
            }
        };
        // The kernel sent INIT with the mount; its answer (the protocol minor a later process
        // must keep speaking) comes within microseconds.
        let waited = std::time::Instant::now();
        while v.minor() == 0 && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(200));
        }
        if v.minor() == 0 {
            let _ = Box::new(v).unmount();
            return Err(mount_err(
                dir,
                "the kernel's INIT was not answered within 5 s",
            ));
        }
        Ok(v)
    }

    /// Serves a live session a previous process mounted (`dev` from the fd keeper or a
    /// handover) without INIT: `minor` is what that process agreed with the kernel, `fs` was
    /// [`MemFs::restore`]d from its inode table and filled anew. Requests the previous process
    /// had read but not answered are queued again, and every entry and inode of the previous
    /// process is invalidated, so the kernel looks names up afresh.
    pub fn adopt(
        dir: &Path,
        dev: std::os::fd::OwnedFd,
        fs: Arc<MemFs>,
        opts: &FuseOptions,
        minor: u32,
    ) -> Result<Self, VolumeError> {
        let rt = runtime();
        let conn = {
            let _in_rt = rt.enter();
            Self::serve(File::from(dev), fs, session_for(opts), minor)
        }
        .map_err(|e| mount_err(dir, e))?;
        let v = Self {
            task: spawn(conn.clone()),
            conn,
            dir: dir.to_owned(),
            linger: opts.linger,
        };
        // Linux ≥ 6.9; before it, a request the dead server had read stays unanswered (its
        // reader waits until the volume goes).
        if let Err(e) = v.notify(|r| r.resend()) {
            tracing::warn!(volume = %dir.display(), error = %e, "cannot ask the kernel to resend requests the previous process had read (FUSE_NOTIFY_RESEND needs Linux 6.9)");
        }
        // Sent from this thread, not a session worker: an invalidation may wait for a lookup
        // the session answers.
        let fs = &v.conn.fs;
        let mut parents = std::collections::BTreeSet::from([ROOT_INO]);
        for (ino, parent, name) in fs.aliases() {
            let _ = v.notify(|r| r.inval_entry(parent, &name));
            let _ = v.notify(|r| r.inval_inode(ino));
            parents.insert(parent);
        }
        // Every name the root shows now, too: after a lost inode table (a damaged record) the
        // kernel's entries are unknown, and a name looked up anew is always right.
        if let Ok(entries) = fs.readdir(ROOT_INO) {
            for (_, _, name) in entries
                .into_iter()
                .filter(|(_, _, n)| n != "." && n != "..")
            {
                let _ = v.notify(|r| r.inval_entry(ROOT_INO, &name));
            }
        }
        for p in parents {
            let _ = v.notify(|r| r.inval_inode(p));
        }
        Ok(v)
    }

    /// The connection number (/sys/fs/fuse/connections/N): the device minor of the mount,
    /// from a `stat` of it (answered by this session; /proc/self/mountinfo grows with the
    /// node's mounts). 0 when unknown.
    pub fn connection(&self) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.dir)
            .map(|m| nix::sys::stat::minor(m.dev()) as u32)
            .unwrap_or(0)
    }

    /// The protocol minor agreed at INIT (0 before).
    pub fn minor(&self) -> u32 {
        self.conn.minor.load(Ordering::Relaxed)
    }

    fn serve(
        dev: File,
        fs: Arc<MemFs>,
        session: Session,
        minor: u32,
    ) -> std::io::Result<Arc<Conn>> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(&dev, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // `AsyncFd::new` is deprecated because a registered descriptor could be closed behind
        // the reactor's back; here the AsyncFd owns the File, so the descriptor lives exactly
        // as long as the registration (the safe `register` needs `unsafe`).
        #[allow(deprecated)]
        let dev = AsyncFd::new(dev)?;
        Ok(Arc::new(Conn {
            dev,
            fs,
            session,
            minor: AtomicU32::new(minor),
        }))
    }

    pub fn fs(&self) -> &Arc<MemFs> {
        &self.conn.fs
    }

    /// The connection's descriptor (to duplicate for a keeper).
    pub fn session_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conn.dev.get_ref().as_fd()
    }

    fn notify(&self, build: impl FnOnce(&mut Reply) -> &[u8]) -> std::io::Result<()> {
        let mut r = Reply::default();
        let bytes = build(&mut r);
        nix::unistd::write(self.conn.dev.get_ref(), bytes)
            .map(|_| ())
            .map_err(std::io::Error::from)
    }
}

fn session_for(opts: &FuseOptions) -> Session {
    if opts.kernel_cache {
        Session {
            ttl: TTL,
            open_flags: wire::FOPEN_KEEP_CACHE,
        }
    } else {
        Session {
            ttl: (0, 0),
            open_flags: wire::FOPEN_DIRECT_IO,
        }
    }
}

fn spawn(conn: Arc<Conn>) -> tokio::task::JoinHandle<()> {
    RUNNING.fetch_add(1, Ordering::AcqRel);
    runtime().spawn(async move {
        run(conn).await;
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    })
}

/// Reads and answers requests until the connection ends (unmounted, or aborted); parks
/// between two requests while sessions are paused ([`pause_serving`]).
async fn run(conn: Arc<Conn>) {
    let mut pause = paused().subscribe();
    loop {
        if *pause.borrow_and_update() {
            RUNNING.fetch_sub(1, Ordering::AcqRel);
            let resumed = pause.wait_for(|p| !*p).await.is_ok();
            RUNNING.fetch_add(1, Ordering::AcqRel);
            if !resumed {
                return;
            }
            continue;
        }
        // A connection that ends (its last mount gone, or aborted) polls as an error, not as
        // readable: wait for both, and let the read tell which (ENODEV ends the session).
        let interest = tokio::io::Interest::READABLE.add(tokio::io::Interest::ERROR);
        let mut guard = tokio::select! {
            biased;
            _ = pause.changed() => continue,
            g = conn.dev.ready(interest) => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "FUSE session cannot wait for requests; it ends");
                    return;
                }
            },
        };
        // Everything queued, then wait again.
        loop {
            if *pause.borrow() {
                break;
            }
            let res = BUFS.with(|b| {
                let (buf, reply) = &mut *b.borrow_mut();
                match nix::unistd::read(conn.dev.get_ref(), buf) {
                    Ok(n) => {
                        handle(&conn, &buf[..n], reply);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            });
            match res {
                Ok(()) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    break;
                }
                // The request was interrupted before it was read: take the next.
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINTR) => continue,
                // Unmounted or aborted: the session is over.
                Err(nix::errno::Errno::ENODEV) => return,
                Err(e) => {
                    tracing::error!(error = %e, "FUSE session read failed; it ends");
                    return;
                }
            }
        }
    }
}

fn wire_attr(a: Attr) -> WireAttr {
    let t = a
        .mtime
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    WireAttr {
        ino: a.ino,
        size: a.size,
        time: (t.as_secs(), t.subsec_nanos()),
        mode: match a.kind {
            NodeKind::Dir => wire::S_IFDIR,
            NodeKind::File => wire::S_IFREG,
        } | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
    }
}

/// Answers one request (or none, for those the kernel expects no answer to).
fn handle(conn: &Conn, bytes: &[u8], r: &mut Reply) {
    let Some((h, body)) = wire::parse_request(bytes) else {
        tracing::warn!(bytes = bytes.len(), "malformed FUSE request ignored");
        return;
    };
    let fs = &conn.fs;
    let s = conn.session;
    let out: &[u8] = match h.opcode {
        op::INIT => {
            let Some((major, minor, max_readahead, flags)) = wire::parse_init(body) else {
                return send(conn, r.error(h.unique, libc::EINVAL));
            };
            if major != wire::KERNEL_VERSION {
                tracing::error!(major, "unsupported FUSE kernel protocol");
                return send(conn, r.error(h.unique, libc::EPROTO));
            }
            let minor = minor.min(wire::MINOR);
            conn.minor.store(minor, Ordering::Relaxed);
            let want = wire::init_flags::ASYNC_READ | wire::init_flags::PARALLEL_DIROPS;
            r.init(h.unique, minor, max_readahead, flags & want)
        }
        op::LOOKUP => match wire::parse_name(body).map(|n| fs.lookup(h.nodeid, n)) {
            Some(Ok(a)) => r.entry(h.unique, &wire_attr(a), s.ttl),
            Some(Err(e)) => r.error(h.unique, errno(e).code()),
            None => r.error(h.unique, libc::ENOENT),
        },
        op::FORGET => {
            fs.forget(h.nodeid, wire::parse_forget(body).unwrap_or(0));
            return;
        }
        op::BATCH_FORGET => {
            for (ino, n) in wire::parse_batch_forget(body) {
                fs.forget(ino, n);
            }
            return;
        }
        op::GETATTR => match fs.getattr(h.nodeid) {
            Ok(a) => r.attr_out(h.unique, &wire_attr(a), s.ttl),
            Err(e) => r.error(h.unique, errno(e).code()),
        },
        #[cfg(feature = "test-controller")]
        op::OPEN if test_unanswered_open() => {
            // TEST ONLY: a server that read this request and died before answering it.
            tracing::warn!(
                "TEST: an OPEN read and left unanswered (KEYBROKER_TEST_UNANSWERED_OPENS)"
            );
            return;
        }
        op::OPEN => {
            let flags = wire::parse_open(body).unwrap_or(0) as i32;
            let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let caller = caller(&h);
            match fs.open(h.nodeid, write, caller) {
                Ok(fh) => r.open(h.unique, fh, s.open_flags),
                Err(e) => r.error(h.unique, errno(e).code()),
            }
        }
        op::READ => {
            match wire::parse_read(body)
                .map(|(fh, off, size)| (fs.read_node(fh, h.nodeid), off, size))
            {
                Some((Ok(node), off, size)) => {
                    r.data(h.unique, read_range(node.bytes(), off, size))
                }
                Some((Err(e), _, _)) => r.error(h.unique, errno(e).code()),
                None => r.error(h.unique, libc::EINVAL),
            }
        }
        op::RELEASE => {
            if let Some(fh) = wire::parse_release(body) {
                fs.release(fh);
            }
            r.empty(h.unique)
        }
        op::OPENDIR => match fs.getattr(h.nodeid) {
            Ok(a) if a.kind == NodeKind::Dir => r.open(h.unique, 0, 0),
            Ok(_) => r.error(h.unique, libc::ENOTDIR),
            Err(e) => r.error(h.unique, errno(e).code()),
        },
        op::READDIR => match (fs.readdir(h.nodeid), wire::parse_read(body)) {
            (Ok(entries), Some((_, offset, size))) => r.dirents(
                h.unique,
                offset,
                size,
                entries
                    .iter()
                    .map(|(ino, kind, name)| (*ino, *kind == NodeKind::Dir, name.as_str())),
            ),
            (Err(e), _) => r.error(h.unique, errno(e).code()),
            (_, None) => r.error(h.unique, libc::EINVAL),
        },
        op::RELEASEDIR | op::DESTROY => r.empty(h.unique),
        op::STATFS => r.statfs(h.unique, 0, 0),
        // Answered once, ENOSYS stops the kernel sending them.
        op::FLUSH | op::GETXATTR | op::LISTXATTR | op::ACCESS | op::POLL => {
            r.error(h.unique, libc::ENOSYS)
        }
        // What a regular file answers to an ioctl (Python's open asks TCGETS).
        op::IOCTL => r.error(h.unique, libc::ENOTTY),
        op::INTERRUPT => return,
        _ => r.error(h.unique, libc::ENOSYS),
    };
    send(conn, out);
}

/// TEST ONLY (builds with the `test-controller` feature): the first N OPEN requests, N from
/// `KEYBROKER_TEST_UNANSWERED_OPENS`, are read and never answered, as by a server killed in
/// the middle of one (what `FUSE_NOTIFY_RESEND` recovers).
#[cfg(feature = "test-controller")]
fn test_unanswered_open() -> bool {
    static LEFT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU32::new(
            std::env::var("KEYBROKER_TEST_UNANSWERED_OPENS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn caller(h: &InHeader) -> Caller {
    Caller {
        tid: h.pid,
        uid: h.uid,
        gid: h.gid,
    }
}

fn send(conn: &Conn, bytes: &[u8]) {
    match nix::unistd::write(conn.dev.get_ref(), bytes) {
        Ok(_) => {}
        // The request was interrupted and the kernel no longer waits for it.
        Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(error = %e, "cannot answer a FUSE request"),
    }
}

impl Volume for MuxVolume {
    fn kind(&self) -> VolumeKind {
        VolumeKind::Fuse
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let fs = &self.conn.fs;
        let changed = fs.apply(files);
        let quiet = |res: std::io::Result<()>, what: &str| {
            if let Err(e) = res
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                tracing::warn!(volume = %self.dir.display(), error = %e, "cannot invalidate {what}");
            }
        };
        for name in &changed {
            // The kernel answers ENOENT when it had nothing cached for the name: fine.
            let (parent, leaf) = fs.entry_of(name);
            quiet(
                self.notify(|r| r.inval_entry(parent, &leaf)),
                "a cached directory entry",
            );
            if parent != ROOT_INO {
                quiet(
                    self.notify(|r| r.inval_inode(parent)),
                    "a cached subdirectory",
                );
            }
        }
        if !changed.is_empty() {
            quiet(
                self.notify(|r| r.inval_inode(ROOT_INO)),
                "the cached directory",
            );
        }
        Ok(changed)
    }

    fn tick(&self) {
        self.conn.fs.flush_reads(false);
    }

    /// Unmounts. A session that another mount namespace still holds is served on (its task
    /// goes on) until that copy goes, for at most `linger`, then its connection is aborted;
    /// unmount never waits for it.
    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        let conn_id = super::fuse::connection_id(&self.dir);
        let res = match nix::mount::umount2(&self.dir, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(volume = %self.dir.display(), "files were still open; detaching the mount lazily");
                nix::mount::umount2(&self.dir, MntFlags::MNT_DETACH)
            }
            r => r,
        };
        let Self {
            conn,
            task,
            linger,
            dir,
        } = *self;
        let err = res.err().map(|e| VolumeError::Unmount {
            path: dir.clone(),
            error: e.to_string(),
        });
        // The session ends (ENODEV) once no mount of the connection is left: normally at
        // once. Wait briefly, as the caller expects an ended session when nobody else holds it.
        let waited = std::time::Instant::now();
        while !task.is_finished() && waited.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if task.is_finished() {
            conn.fs.flush_reads(true);
        } else {
            super::fuse::linger_started(&dir, &conn.fs, linger);
            runtime().spawn(async move {
                let mut task = task;
                let started = std::time::Instant::now();
                let how = match tokio::time::timeout(linger, &mut task).await {
                    Ok(_) => format!(
                        "the last mount of the volume went after {}; session ended",
                        humantime::format_duration(Duration::from_secs(
                            started.elapsed().as_secs()
                        ))
                    ),
                    Err(_) => {
                        let how = match conn_id.map(super::fuse::abort_connection) {
                            Some(Ok(())) => {
                                match tokio::time::timeout(Duration::from_secs(10), task).await {
                                    Ok(_) => "connection aborted".to_string(),
                                    Err(_) => {
                                        "connection aborted, but the session did not end".into()
                                    }
                                }
                            }
                            Some(Err(e)) => format!("cannot abort the connection: {e}"),
                            None => "cannot abort the connection: its number is unknown".into(),
                        };
                        format!(
                            "another mount namespace still held the volume after {}: {how}",
                            humantime::format_duration(linger)
                        )
                    }
                };
                super::fuse::linger_ended(&dir, &conn.fs, how);
            });
        }
        err.map_or(Ok(()), Err)
    }
}
