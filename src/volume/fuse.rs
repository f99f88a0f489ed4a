//! The FUSE edge: a thin `fuser` adapter over [`MemFs`]. No logic lives here beyond translating
//! requests and replies, mapping [`FsError`] to errno (one exhaustive match), and telling the
//! kernel which directory entries a rotation replaced.
//!
//! Kernel caching: entries and attributes are cached for a day and file pages are kept across
//! opens (`FOPEN_KEEP_CACHE`); this is safe because an inode's content never changes (see
//! [`MemFs`]). An open still reaches this process, so every open is audited and pins a version.
//! `flush` answers ENOSYS once, after which the kernel stops sending it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request, SessionACL,
};

use super::content::RenderedFile;
use super::memfs::{Attr, Caller, FsError, MemFs, NodeKind, ROOT_INO, read_range};
use super::{Volume, VolumeError, VolumeKind};

const TTL: Duration = Duration::from_secs(24 * 3600);

/// The one place a filesystem error becomes an errno.
pub fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::ReadOnly => Errno::EROFS,
        FsError::BadHandle => Errno::EBADF,
        FsError::AuditDown => Errno::EIO,
        FsError::Stale => Errno::ESTALE,
        FsError::Refused => Errno::EACCES,
    }
}

fn to_fuser(a: Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            NodeKind::Dir => FileType::Directory,
            NodeKind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

struct Adapter {
    fs: Arc<MemFs>,
    ttl: Duration,
    open_flags: FopenFlags,
}

impl Filesystem for Adapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &to_fuser(a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &to_fuser(a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let caller = Caller {
            tid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.fs.open(ino.0, write, caller) {
            Ok(fh) => reply.opened(FileHandle(fh), self.open_flags),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.handle(fh.0) {
            Ok(node) => reply.data(read_range(node.bytes(), offset, size)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only volume; ENOSYS tells the kernel to stop sending flush.
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes; ENOSYS makes the kernel stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: ENOTTY is what a regular file answers (Python's text-mode open asks
        // TCGETS on every open); quietly, as it is no error.
        reply.error(Errno::ENOTTY);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.fs.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let kind = match kind {
                NodeKind::Dir => FileType::Directory,
                NodeKind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Options of a FUSE mount.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Request-serving threads (2 measured best on 2 cores).
    pub threads: usize,
    /// Let users other than the mounting one read (the kernel still enforces file modes).
    pub allow_other: bool,
    /// Let the kernel cache entries, attributes and pages (safe: inodes are immutable). Off
    /// only to measure the uncached baseline.
    pub kernel_cache: bool,
    /// After unmount, how long a session that another mount namespace still holds is served
    /// before its connection is aborted.
    pub linger: Duration,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            allow_other: true,
            kernel_cache: true,
            linger: Duration::from_secs(3600),
        }
    }
}

/// A live FUSE mount of a [`MemFs`].
pub struct FuseVolume {
    fs: Arc<MemFs>,
    notifier: Notifier,
    session: fuser::BackgroundSession,
    dir: PathBuf,
    /// How long to keep serving after unmount while another mount namespace holds a copy.
    linger: Duration,
}

/// Sessions unmounted here but still served because another mount namespace holds a copy.
static LINGERING: AtomicU64 = AtomicU64::new(0);

/// How many unmounted FUSE sessions are still being served (see [`FuseVolume::unmount`]).
pub fn lingering_sessions() -> u64 {
    LINGERING.load(Ordering::Relaxed)
}

/// How long unmount waits for the session to end before leaving it to a background thread.
const UNMOUNT_WAIT: Duration = Duration::from_millis(500);

impl FuseVolume {
    /// Mounts `fs` at `dir` (which must exist and not be a mount already).
    pub fn mount(dir: &Path, fs: Arc<MemFs>, opts: &FuseOptions) -> Result<Self, VolumeError> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            MountOption::NoAtime,
            // The kernel checks modes and owners itself: a file with mode 0400 is unreadable by
            // other uids even though this process could serve it.
            MountOption::DefaultPermissions,
            MountOption::FSName("keybroker".into()),
            MountOption::Subtype("keybroker".into()),
        ];
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = opts.threads > 1;
        let adapter = if opts.kernel_cache {
            Adapter {
                fs: fs.clone(),
                ttl: TTL,
                open_flags: FopenFlags::FOPEN_KEEP_CACHE,
            }
        } else {
            Adapter {
                fs: fs.clone(),
                ttl: Duration::ZERO,
                open_flags: FopenFlags::FOPEN_DIRECT_IO,
            }
        };
        let session =
            fuser::spawn_mount(adapter, dir, &config).map_err(|e| VolumeError::Mount {
                kind: VolumeKind::Fuse,
                path: dir.to_owned(),
                error: e.to_string(),
            })?;
        Ok(Self {
            notifier: session.notifier(),
            fs,
            session,
            dir: dir.to_owned(),
            linger: opts.linger,
        })
    }

    pub fn fs(&self) -> &Arc<MemFs> {
        &self.fs
    }
}

impl Volume for FuseVolume {
    fn kind(&self) -> VolumeKind {
        VolumeKind::Fuse
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let changed = self.fs.apply(files);
        for name in &changed {
            // The kernel answers ENOENT when it had nothing cached for the name: fine.
            let (parent, leaf) = self.fs.entry_of(name);
            if let Err(e) = self
                .notifier
                .inval_entry(INodeNo(parent), OsStr::new(&leaf))
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                tracing::warn!(volume = %self.dir.display(), file = %name, error = %e, "cannot invalidate a cached directory entry");
            }
            if parent != ROOT_INO
                && let Err(e) = self.notifier.inval_inode(INodeNo(parent), 0, 0)
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                tracing::warn!(volume = %self.dir.display(), error = %e, "cannot invalidate a cached subdirectory");
            }
        }
        if !changed.is_empty()
            && let Err(e) = self.notifier.inval_inode(INodeNo(ROOT_INO), 0, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::warn!(volume = %self.dir.display(), error = %e, "cannot invalidate the cached directory");
        }
        Ok(changed)
    }

    fn tick(&self) {
        self.fs.flush_reads(false);
    }

    /// Unmounts and returns promptly. The kernel connection lives on while another mount
    /// namespace holds a copy of the mount (a process that unshared its mounts while the
    /// volume was mounted): the session is served until that copy goes, for at most
    /// `linger`, then its connection is aborted. That wait happens on a background thread,
    /// logged and audited, so a NodeUnpublishVolume never waits on another namespace.
    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        let dir = self.dir.clone();
        let Self {
            session,
            fs,
            linger,
            ..
        } = *self;
        let conn = connection_id(&dir);
        let (tx, rx) = std::sync::mpsc::channel();
        let joiner = std::thread::Builder::new()
            .name("fuse-unmount".into())
            .spawn(move || {
                let _ = tx.send(session.umount_and_join());
            })
            .map_err(|e| VolumeError::Unmount {
                path: dir.clone(),
                error: e.to_string(),
            })?;
        let res = match rx.recv_timeout(UNMOUNT_WAIT) {
            Ok(r) => {
                let _ = joiner.join();
                r
            }
            Err(_) => {
                let still_here = super::mountpoint::mount_at(&dir)
                    .is_some_and(|m| super::mountpoint::is_keybroker_mount(&m));
                if still_here {
                    // The unmount itself is stuck (not the join): detach.
                    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
                }
                linger_in_background(dir.clone(), fs.clone(), conn, rx, joiner, linger);
                return Ok(());
            }
        };
        fs.flush_reads(true);
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // A reader still has a file open (or its cwd inside): detach now, the kernel
                // finishes the unmount when the last user goes.
                tracing::warn!(volume = %dir.display(), "files were still open; detaching the mount lazily");
                nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                    VolumeError::Unmount {
                        path: dir.clone(),
                        error: e.to_string(),
                    }
                })
            }
            Err(e) => Err(VolumeError::Unmount {
                path: dir,
                error: e.to_string(),
            }),
        }
    }
}

/// The FUSE connection number of the mount at `dir` (its device minor), which names the
/// connection under /sys/fs/fuse/connections.
pub(crate) fn connection_id(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.to_str()?;
    text.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        let (_, post) = l.split_once(" - ")?;
        let mut post = post.split(' ');
        let keybroker = post.next()?.starts_with("fuse") && post.next() == Some("keybroker");
        (mp == want && keybroker)
            .then(|| dev.split_once(':')?.1.parse().ok())
            .flatten()
    })
}

/// Aborts a FUSE connection through fusectl, mounting fusectl first where the system has not.
pub(crate) fn abort_connection(conn: u32) -> std::io::Result<()> {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() && super::mountpoint::mount_at(dir).is_none() {
        nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
    }
    std::fs::write(abort, "1")
}

/// A session outlives its unmount (another mount namespace holds the volume): counted, logged,
/// audited.
pub(crate) fn linger_started(dir: &Path, fs: &MemFs, linger: Duration) {
    LINGERING.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(volume = %dir.display(), linger = ?linger, "unmounted, but another mount namespace still holds the FUSE volume; serving it there until that copy goes");
    fs.audit_note(format!(
        "unmounted at {}; another mount namespace still holds the volume, served until it lets go (at most {})",
        dir.display(),
        humantime::format_duration(linger)
    ));
}

/// The lingering session ended (`how`).
pub(crate) fn linger_ended(dir: &Path, fs: &MemFs, how: String) {
    LINGERING.fetch_sub(1, Ordering::Relaxed);
    fs.flush_reads(true);
    tracing::info!(volume = %dir.display(), "{how}");
    fs.audit_note(how);
}

/// Waits (off the caller's thread) for a session whose mount another namespace still holds;
/// aborts its connection after `linger`. Audited at both ends.
fn linger_in_background(
    dir: PathBuf,
    fs: Arc<MemFs>,
    conn: Option<u32>,
    rx: std::sync::mpsc::Receiver<std::io::Result<()>>,
    joiner: std::thread::JoinHandle<()>,
    linger: Duration,
) {
    linger_started(&dir, &fs, linger);
    let spawned = std::thread::Builder::new()
        .name("fuse-linger".into())
        .spawn(move || {
            let started = Instant::now();
            let ended = match rx.recv_timeout(linger.saturating_sub(UNMOUNT_WAIT)) {
                Ok(_) => {
                    let _ = joiner.join();
                    format!(
                        "the last mount of the volume went after {}; session ended",
                        humantime::format_duration(Duration::from_secs(
                            started.elapsed().as_secs()
                        ))
                    )
                }
                Err(_) => {
                    let how = match conn.map(abort_connection) {
                        Some(Ok(())) => match rx.recv_timeout(Duration::from_secs(10)) {
                            Ok(_) => {
                                let _ = joiner.join();
                                "connection aborted".to_string()
                            }
                            Err(_) => "connection aborted, but the session did not end".into(),
                        },
                        Some(Err(e)) => format!("cannot abort the connection: {e}"),
                        None => "cannot abort the connection: its number is unknown".into(),
                    };
                    format!(
                        "another mount namespace still held the volume after {}: {how}",
                        humantime::format_duration(linger)
                    )
                }
            };
            linger_ended(&dir, &fs, ended);
        });
    if spawned.is_err() {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        tracing::error!("cannot start the thread that ends a lingering FUSE session");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fs_error_has_its_errno() {
        let table = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::NotDir, libc::ENOTDIR),
            (FsError::IsDir, libc::EISDIR),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::BadHandle, libc::EBADF),
            (FsError::AuditDown, libc::EIO),
            (FsError::Stale, libc::ESTALE),
            (FsError::Refused, libc::EACCES),
        ];
        for (e, want) in table {
            assert_eq!(errno(e), Errno::from_i32(want), "{e:?}");
        }
    }
}
