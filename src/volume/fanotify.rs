//! Every open of a tmpfs volume's files audited without being in the read path: one fanotify
//! group for the node, a filesystem mark on each volume's tmpfs instance (so an open through any
//! mount of it counts: the target, a container's bind mount, another mount namespace), and one
//! listener thread that turns events into the same coalesced `read` records a FUSE open gets.
//!
//! - **Identify mode** (default): `FAN_OPEN_PERM`; each open waits in the kernel only until the
//!   listener has identified the opener from /proc (pid, uid, gid, command, executable, cgroup,
//!   pod and container), which it certainly can then: the opener cannot exit meanwhile. The
//!   open is allowed at once and its record written afterwards. Every open is attributed
//!   whatever the machine's load and however short the reader's life; counts are exact.
//! - **Notification mode** (`--audit-opens notify`): `FAN_OPEN`; the reader never waits for
//!   keybroker, but a process that has exited before its event is read is recorded by pid
//!   alone (1% of 500 quick `cat`s kept their name on an idle machine). Every process that
//!   opens a file version is recorded (its first open in each one-second window, at once). The
//!   kernel merges a process's repeated opens of one file while they wait unread in the queue,
//!   so the window's `count` is a lower bound here, not the exact number.
//! - **Permission mode** (`--audit-fail-closed`): `FAN_OPEN_PERM`; each batch of opens is
//!   recorded, the audit writer is flushed, and only then are the opens allowed; while the log
//!   cannot be written they are refused (EPERM), and the refusals are recorded. Permission
//!   events are never merged: counts are exact.
//! - A queue overflow (the kernel dropped events) becomes a `gap` record naming every watched
//!   volume and the time span in which opens may be missing: never silent.
//! - In notification mode, with `FAN_REPORT_PIDFD` (Linux ≥ 5.15), each event carries a pidfd;
//!   the process details read from /proc are kept only if the pidfd shows the same process still
//!   holds the pid afterwards (a reused pid is never attributed to the wrong program). A process
//!   that exited before its event was read is recorded by pid alone. In identify and permission
//!   modes the opener waits in `open` meanwhile, so /proc is read while it certainly exists.
//!
//! The kernel hands over one descriptor per event (the opened file, and the pidfd): both are
//! read through /proc/self/fd and closed here, so no descriptor outlives its event.
//!
//! In the permission modes the group outlives the process: the fd keeper holds it (as it holds
//! FUSE sessions) and a handover passes it on, so while no keybroker runs the opens of marked
//! volumes wait in the kernel instead of being allowed, and the next process answers them
//! ([`OpenAudit::start`] with the kept group). Until that process has taken its volumes back
//! ([`OpenAudit::ready`]) an event of a volume it does not know yet is held, not allowed. The
//! queue is unlimited in these modes: a full queue would let a permission event through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::access::{Readers, Refusal};
use crate::audit::{AuditLog, Event, EventKind, Outcome};
use crate::procinfo::{ProcCache, ProcessRef};
use crate::volume::content::RenderedFile;
use crate::volume::fair::{FairQueue, Fairness};
use crate::volume::inflight::{Inflight, Unanswered};
use crate::volume::opens::OpenWindows;
use crate::volume::{Volume, VolumeError, VolumeKind};

/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8, metadata_len u16,
/// mask u64, fd i32, pid i32.
const METADATA_LEN: usize = 24;
const FANOTIFY_METADATA_VERSION: u8 = 3;
/// `FAN_EVENT_INFO_TYPE_PIDFD` and `struct fanotify_event_info_pidfd` (header + i32).
const INFO_TYPE_PIDFD: u8 = 4;
const FAN_OPEN_BIT: u64 = 0x20;
const FAN_OPEN_PERM_BIT: u64 = 0x0001_0000;
const FAN_Q_OVERFLOW_BIT: u64 = 0x4000;
const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;

/// How opens are watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Events after the fact; readers never wait; a reader gone before its event is read is
    /// recorded by pid alone.
    Notify,
    /// Opens wait until the opener is identified (not until the record is written).
    Identify,
    /// Opens wait until their record is written; refused while it cannot be.
    Permission,
}

impl Mode {
    /// The fanotify event this mode marks volumes for.
    fn mask(self) -> MaskFlags {
        match self {
            Mode::Notify => MaskFlags::FAN_OPEN,
            Mode::Identify | Mode::Permission => MaskFlags::FAN_OPEN_PERM,
        }
    }
}

/// One file version of a volume, known by its inode.
#[derive(Clone, Debug)]
struct FileInfo {
    name: String,
    object: String,
    version: String,
}

struct Watched {
    volume: String,
    /// The pod whose volume this is: its reads name it.
    pod: Option<crate::audit::PodRef>,
    /// Who may open its files (refused opens are answered FAN_DENY).
    readers: Readers,
    /// Files of the current and the previous write, by inode (a reader may still be opening
    /// the previous version when a rotation lands).
    current: HashMap<u64, FileInfo>,
    previous: HashMap<u64, FileInfo>,
}

/// (pid, uid, device, inode, refused): one process, one file version, read or refused.
type OpenKey = (u32, u32, u64, u64, bool);

struct Shared {
    /// This process's journal of the events being decided (`volume::inflight`).
    inflight: Option<Inflight>,
    /// A dead process's unanswered events it had noted, by descriptor number: answered by
    /// their volume's policy once this process has its volumes back (or first, whenever this
    /// process answers an event of its own with the same number).
    reserved: Mutex<Reserved>,
    has_reserved: AtomicBool,
    /// What an event of an unknown opener gets (refused where a binding refuses readers).
    unknown_verdict: u32,
    /// The group; `None` once stopped (closed).
    fan: std::sync::RwLock<Option<Fanotify>>,
    /// False while a process that took a kept group over has not taken its volumes back:
    /// events of volumes it does not know yet are held (`deferred`), not allowed.
    ready: AtomicBool,
    deferred: Mutex<Vec<RawEvent>>,
    inherited: bool,
    mode: Mode,
    pidfd: bool,
    audit: AuditLog,
    /// Watched volumes by the device number of their tmpfs.
    volumes: Mutex<HashMap<u64, Watched>>,
    windows: Mutex<OpenWindows<OpenKey>>,
    procs: Mutex<ProcCache>,
    stop: AtomicBool,
    /// Opens seen (for tests and metrics).
    opens: AtomicU64,
    /// Opens refused by a volume's readers policy.
    refusals: AtomicU64,
    overflows: AtomicU64,
    /// What the listener's turns have done (`fair::Fairness`), for tests and metrics.
    lone_waited_behind: AtomicU64,
    widest_round: AtomicU64,
    longest_line: AtomicU64,
    /// When a read last found the queue empty: an overflow's lost events came after it.
    last_empty: Mutex<SystemTime>,
    /// An overflow being measured: since when opens may be missing.
    gap: Mutex<Option<SystemTime>>,
}

/// The name the fd keeper and a handover give the node's fanotify group.
pub const KEPT_NAME: &str = "group:fanotify";

/// The node's open auditor: one fanotify group, one listener thread.
pub struct OpenAudit {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl OpenAudit {
    /// Creates the group (or takes `kept` over: a permission-mode group the fd keeper held or
    /// a previous process handed over) and starts the listener. Needs CAP_SYS_ADMIN. A process
    /// that took a group over calls [`Self::ready`] once its volumes are watched again.
    /// `orphans`: the group's previous reader died; `Some(true)` refuses the opens it left
    /// unanswered, `Some(false)` allows them.
    pub fn start(
        audit: AuditLog,
        mode: Mode,
        kept: Option<std::os::fd::OwnedFd>,
        orphans: Option<bool>,
    ) -> std::io::Result<Arc<Self>> {
        Self::start_in(audit, mode, kept, orphans, None)
    }

    /// [`Self::start`], journaling the events being decided in `state_dir` (the node's): after
    /// a crash the next process answers the events the dead one was deciding by their
    /// volume's policy instead of refusing them (`volume::inflight`).
    pub fn start_in(
        audit: AuditLog,
        mode: Mode,
        kept: Option<std::os::fd::OwnedFd>,
        orphans: Option<bool>,
        state_dir: Option<&Path>,
    ) -> std::io::Result<Arc<Self>> {
        let class = match mode {
            Mode::Notify => InitFlags::FAN_CLASS_NOTIF,
            // A full queue would allow a permission event unanswered: no limit (each waiting
            // event is a task blocked in open, bounded by the node's tasks).
            Mode::Identify | Mode::Permission => {
                InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_UNLIMITED_QUEUE
            }
        };
        let base = class | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK;
        let f_flags = EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC;
        let kept = match kept.map(|fd| adopt_group(fd, mode)) {
            Some(Ok(fan)) => Some(fan),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the kept fanotify group cannot be used; starting a new one");
                None
            }
            None => None,
        };
        let inherited = kept.is_some();
        // `orphans`: the group's last reader died (Some), and whether what it left unanswered
        // is refused (a binding refuses readers) or allowed.
        let journal_dir = state_dir.filter(|_| mode != Mode::Notify);
        // Dead processes' journals are taken over in any case (dropped, and so removed, when
        // no group came with them).
        let noted = journal_dir.map(Inflight::orphaned).unwrap_or_default();
        let mut reserved = Reserved::default();
        let mut unknown_verdict = FAN_DENY;
        if let (Some(fan), Some(refuse_orphans)) = (&kept, orphans) {
            // The events the dead processes noted wait until this process has its volumes
            // back and answers them by policy. The kernel matches an answer to the oldest
            // event of that number, so they are answered first whenever this process answers
            // an event of its own with the same number (`answer`).
            reserved = Reserved::from(noted);
            let verdict = if refuse_orphans { FAN_DENY } else { FAN_ALLOW };
            unknown_verdict = verdict;
            let skip: std::collections::HashSet<i32> = reserved.by_fd.keys().copied().collect();
            let n = answer_orphans(fan, verdict, &skip);
            if n > 0 {
                let (kind, what) = if refuse_orphans {
                    (
                        EventKind::Error,
                        "refused, as their openers are unknown and a binding refuses readers (they see EPERM)",
                    )
                } else {
                    (
                        EventKind::Gap,
                        "allowed, their openers unknown (no binding refuses readers)",
                    )
                };
                let detail = format!(
                    "{n} opens of tmpfs volumes were being decided when the previous keybroker process died; {what}"
                );
                tracing::warn!(opens = n, "{detail}");
                audit.record(Event::new(kind).outcome(Outcome::Failure).detail(detail));
            }
        }
        // With permission events the opener waits in open() while its event is handled, so
        // its /proc entry cannot go away meanwhile: no pidfd needed (and none to make per open).
        let (fan, pidfd) = match mode {
            Mode::Identify | Mode::Permission => match kept {
                Some(fan) => (fan, false),
                None => (Fanotify::init(base, f_flags)?, false),
            },
            Mode::Notify => match Fanotify::init(base | InitFlags::FAN_REPORT_PIDFD, f_flags) {
                Ok(f) => (f, true),
                // Kernels before 5.15 have no FAN_REPORT_PIDFD.
                Err(nix::errno::Errno::EINVAL) => (Fanotify::init(base, f_flags)?, false),
                Err(e) => return Err(e.into()),
            },
        };
        if mode == Mode::Notify && !pidfd {
            tracing::warn!(
                "this kernel has no FAN_REPORT_PIDFD (Linux < 5.15): opens are attributed by pid alone"
            );
        }
        let inflight = match journal_dir.map(Inflight::create) {
            Some(Ok(j)) => Some(j),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot journal the opens being decided: after a crash the next process refuses them where a binding refuses readers");
                None
            }
            None => None,
        };
        if !reserved.by_fd.is_empty() {
            tracing::info!(
                opens = reserved.by_fd.values().map(|v| v.len()).sum::<usize>(),
                "the previous keybroker process died deciding opens; they are answered by their volumes' policies once the volumes are back"
            );
        }
        let shared = Arc::new(Shared {
            inflight,
            has_reserved: AtomicBool::new(!reserved.by_fd.is_empty()),
            reserved: Mutex::new(reserved),
            unknown_verdict,
            fan: std::sync::RwLock::new(Some(fan)),
            ready: AtomicBool::new(!inherited),
            deferred: Mutex::new(Vec::new()),
            inherited,
            mode,
            pidfd,
            audit,
            volumes: Mutex::new(HashMap::new()),
            windows: Mutex::new(OpenWindows::default()),
            procs: Mutex::new(ProcCache::default()),
            stop: AtomicBool::new(false),
            opens: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            lone_waited_behind: AtomicU64::new(0),
            widest_round: AtomicU64::new(0),
            longest_line: AtomicU64::new(0),
            last_empty: Mutex::new(SystemTime::now()),
            gap: Mutex::new(None),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kb-fanotify".into())
            .spawn(move || listen(&s))?;
        Ok(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// Whether this process took its group over (from the fd keeper or a handover).
    pub fn inherited(&self) -> bool {
        self.shared.inherited
    }

    /// The volumes are watched again: held events are answered now (a volume still unknown
    /// is no longer a keybroker volume, and its opens are allowed as any other file's).
    pub fn ready(&self) {
        self.shared.ready.store(true, Ordering::Relaxed);
    }

    /// A duplicate of the group's descriptor, for the fd keeper and a handover (permission
    /// modes: a notification group need not outlive the process).
    pub fn group_fd(&self) -> Option<std::os::fd::OwnedFd> {
        if self.shared.mode == Mode::Notify {
            return None;
        }
        let group = self.shared.group();
        let fan = group.as_ref()?;
        std::os::fd::AsFd::as_fd(fan).try_clone_to_owned().ok()
    }

    /// Whether events carry a pidfd (FAN_REPORT_PIDFD).
    pub fn reports_pidfd(&self) -> bool {
        self.shared.pidfd
    }

    /// Opens seen so far (every event, before coalescing).
    pub fn opens(&self) -> u64 {
        self.shared.opens.load(Ordering::Relaxed)
    }

    /// Opens refused by a volume's readers policy.
    pub fn refusals(&self) -> u64 {
        self.shared.refusals.load(Ordering::Relaxed)
    }

    /// How fair the listener's turns have been (see `volume::fair`): the most answers an open
    /// waited behind when its pod had nothing else waiting, the widest round, the longest line.
    pub fn fairness(&self) -> Fairness {
        let s = &self.shared;
        Fairness {
            lone_waited_behind: s.lone_waited_behind.load(Ordering::Relaxed),
            widest_round: s.widest_round.load(Ordering::Relaxed),
            longest_line: s.longest_line.load(Ordering::Relaxed),
        }
    }

    pub fn overflows(&self) -> u64 {
        self.shared.overflows.load(Ordering::Relaxed)
    }

    /// Marks the tmpfs instance mounted at `root` (the volume's staging mount) of `pod`'s
    /// volume `volume`, whose files `readers` may open. A policy that refuses opens needs
    /// permission events: in notification mode it is an error.
    pub fn watch(
        &self,
        volume: &str,
        root: &Path,
        pod: Option<crate::audit::PodRef>,
        readers: Readers,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if readers.enforced() && self.shared.mode == Mode::Notify {
            return Err(std::io::Error::other(
                "the binding allows only the pod's own processes to open the files (readers: pod), which needs permission events; this node audits opens with --audit-opens notify-best-effort, which cannot refuse an open",
            ));
        }
        let dev = std::fs::metadata(root)?.dev();
        let group = self.shared.group();
        let Some(fan) = group.as_ref() else {
            return Err(std::io::Error::other("the open auditor has stopped"));
        };
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            self.shared.mode.mask(),
            nix::fcntl::AT_FDCWD,
            Some(root),
        )?;
        lock(&self.shared.volumes).insert(
            dev,
            Watched {
                volume: volume.to_owned(),
                pod,
                readers,
                current: HashMap::new(),
                previous: HashMap::new(),
            },
        );
        Ok(())
    }

    /// Learns the inodes of a volume's files after a write (so records name the version).
    pub fn learn(&self, root: &Path, files: &[RenderedFile]) {
        use std::os::unix::fs::MetadataExt;
        let Ok(dev) = std::fs::metadata(root).map(|m| m.dev()) else {
            return;
        };
        let data = root.join(crate::volume::tmpfs::DATA_LINK);
        let current: HashMap<u64, FileInfo> = files
            .iter()
            .filter_map(|f| {
                let ino = std::fs::metadata(data.join(f.name.as_str())).ok()?.ino();
                Some((
                    ino,
                    FileInfo {
                        name: f.name.as_str().to_owned(),
                        object: f.object.clone(),
                        version: f.version.clone(),
                    },
                ))
            })
            .collect();
        if let Some(w) = lock(&self.shared.volumes).get_mut(&dev)
            && w.current.keys().ne(current.keys())
        {
            w.previous = std::mem::replace(&mut w.current, current);
        }
    }

    /// Stops watching the volume at `root` (before it is unmounted); its open windows are
    /// recorded.
    pub fn unwatch(&self, root: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(dev) = std::fs::metadata(root).map(|m| m.dev()) else {
            return;
        };
        if let Some(fan) = self.shared.group().as_ref() {
            let _ = fan.mark(
                MarkFlags::FAN_MARK_REMOVE | MarkFlags::FAN_MARK_FILESYSTEM,
                self.shared.mode.mask(),
                nix::fcntl::AT_FDCWD,
                Some(root),
            );
        }
        lock(&self.shared.volumes).remove(&dev);
        lock(&self.shared.windows).flush_where(&self.shared.audit, |k| k.2 == dev);
    }

    /// Stops the listener and releases the group (its marks go with it); open windows are
    /// recorded.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        // Opens held for volumes this process never took back: refused, never left waiting
        // (the group outlives this process, and an event read here can be answered only here).
        let held = std::mem::take(&mut *lock(&self.shared.deferred));
        if let Some(fan) = self.shared.group().as_ref() {
            if !held.is_empty() {
                tracing::warn!(
                    opens = held.len(),
                    "stopping before the volumes were taken back: the opens that waited are refused"
                );
            }
            for ev in held {
                answer(&self.shared, fan, ev.fd, FAN_DENY);
                ev.pidfd.into_iter().for_each(close);
            }
        }
        if let Some(fan) = self.shared.group().as_ref() {
            answer_reserved(&self.shared, fan);
        }
        // The group is closed: the kernel allows every permission event nobody will answer
        // now and removes the marks, so no open waits on a listener that has stopped (a
        // process that handed its volumes over may live on for a while).
        *self.shared.fan.write().unwrap_or_else(|p| p.into_inner()) = None;
        lock(&self.shared.windows).flush(&self.shared.audit, true);
        record_gap(&self.shared, true);
    }
}

impl Drop for OpenAudit {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// The group while it is open (held for reading: `stop` closes it only after).
    fn group(&self) -> std::sync::RwLockReadGuard<'_, Option<Fanotify>> {
        self.fan.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One event as read from the group.
#[derive(Debug, PartialEq, Eq)]
struct RawEvent {
    mask: u64,
    fd: i32,
    pid: i32,
    pidfd: Option<i32>,
    /// The opened file, once looked at.
    file: Option<FileId>,
}

/// What an event's descriptor is open on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    dir: bool,
}

/// The file an event's descriptor is open on (`fstat`).
#[allow(unsafe_code)]
fn file_id(fd: i32) -> Option<FileId> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is an event's descriptor, which this process received from the kernel and
    // closes only after answering the event (`answer`, `close`); the borrow ends here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let st = nix::sys::stat::fstat(fd).ok()?;
    Some(FileId {
        dev: st.st_dev,
        ino: st.st_ino,
        dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
    })
}

/// Parses a buffer of events (metadata and info records), as the kernel writes them.
fn parse_events(buf: &[u8]) -> Vec<RawEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while buf.len() - off >= METADATA_LEN {
        let b = &buf[off..];
        let event_len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let vers = b[4];
        let metadata_len = u16::from_ne_bytes([b[6], b[7]]) as usize;
        if event_len < METADATA_LEN || event_len > b.len() || vers != FANOTIFY_METADATA_VERSION {
            break;
        }
        let mask = u64::from_ne_bytes(b[8..16].try_into().unwrap_or_default());
        let fd = i32::from_ne_bytes(b[16..20].try_into().unwrap_or_default());
        let pid = i32::from_ne_bytes(b[20..24].try_into().unwrap_or_default());
        let mut pidfd = None;
        let mut i = metadata_len.max(METADATA_LEN);
        while i + 4 <= event_len {
            let (info_type, len) = (b[i], u16::from_ne_bytes([b[i + 2], b[i + 3]]) as usize);
            if len < 4 || i + len > event_len {
                break;
            }
            if info_type == INFO_TYPE_PIDFD && len >= 8 {
                pidfd = Some(i32::from_ne_bytes(
                    b[i + 4..i + 8].try_into().unwrap_or_default(),
                ));
            }
            i += len;
        }
        out.push(RawEvent {
            mask,
            fd,
            pid,
            pidfd,
            file: None,
        });
        off += event_len;
    }
    out
}

/// The name of a volume file from the path of its open descriptor: what follows the atomic
/// writer's snapshot directory (`..2026_12_01_…/name`), whatever mount it was opened through.
fn name_from_path(path: &str) -> Option<String> {
    let mut parts = path.rsplit('/').collect::<Vec<_>>();
    parts.reverse();
    let snap = parts
        .iter()
        .rposition(|p| p.starts_with("..") && p.len() > 2)?;
    let rest = parts[snap + 1..].join("/");
    (!rest.is_empty()).then_some(rest)
}

/// Answers the permission events a dead process had read and not answered. The kernel
/// matches an answer to an event by the descriptor number the reader got for it, and such
/// an event would keep its opener waiting for good (the keeper holds the group), or, worse,
/// take the answer this process means for an event of its own with the same number. Their
/// openers are unknown: they get `verdict`. Called before this process reads any event;
/// returns how many there were.
fn answer_orphans(fan: &Fanotify, verdict: u32, skip: &std::collections::HashSet<i32>) -> usize {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(4096, |(soft, _)| soft)
        .min(8192) as i32;
    (0..limit)
        .filter(|fd| !skip.contains(fd) && respond(fan, *fd, verdict))
        .count()
}

/// Writes one answer; whether the kernel had an event of that number waiting.
fn respond(fan: &Fanotify, fd: i32, verdict: u32) -> bool {
    let mut resp = [0u8; 8];
    resp[..4].copy_from_slice(&fd.to_ne_bytes());
    resp[4..].copy_from_slice(&verdict.to_ne_bytes());
    nix::unistd::write(fan, &resp).is_ok()
}

/// Answers every event a dead process had noted and left unanswered (called once this
/// process has its volumes back, and when it stops).
fn answer_reserved(s: &Shared, fan: &Fanotify) {
    let mut r = lock(&s.reserved);
    let fds: Vec<i32> = r.by_fd.keys().copied().collect();
    for fd in fds {
        r.answer_all(s, fan, fd);
    }
    // Every event they named is answered: the journals go.
    r.journals.clear();
    s.has_reserved.store(false, Ordering::Relaxed);
}

/// The events dead processes noted and left unanswered, by descriptor number (oldest first:
/// the order the kernel matches answers in), each with the journal that names it.
#[derive(Default)]
struct Reserved {
    by_fd: HashMap<i32, std::collections::VecDeque<(usize, Unanswered)>>,
    /// Taken over: locked by this process, cleared slot by slot, removed once all answered.
    journals: Vec<Inflight>,
}

impl From<Vec<(Inflight, HashMap<i32, Unanswered>)>> for Reserved {
    fn from(noted: Vec<(Inflight, HashMap<i32, Unanswered>)>) -> Self {
        let mut r = Reserved::default();
        for (i, (journal, events)) in noted.into_iter().enumerate() {
            for (fd, u) in events {
                r.by_fd.entry(fd).or_default().push_back((i, u));
            }
            r.journals.push(journal);
        }
        r
    }
}

impl Reserved {
    /// Answers every noted event with number `fd`, oldest first, each by its policy.
    fn answer_all(&mut self, s: &Shared, fan: &Fanotify, fd: i32) {
        for (i, u) in self.by_fd.remove(&fd).unwrap_or_default() {
            let verdict = decide_reserved(s, u);
            if let Some(j) = self.journals.get(i) {
                j.clear(fd);
            }
            respond(fan, fd, verdict);
        }
    }
}

/// The verdict on a dead process's noted event, by its volume's policy, recorded like any
/// open. Before this process has its volumes back, a volume it does not know yet is an
/// unknown opener's.
fn decide_reserved(s: &Shared, u: Unanswered) -> u32 {
    let watched = lock(&s.volumes)
        .get(&u.dev)
        .map(|w| (w.volume.clone(), w.pod.clone(), w.readers.clone()));
    let Some((volume, pod, readers)) = watched else {
        return if s.ready.load(Ordering::Relaxed) {
            // Not a volume any more: not ours to refuse.
            FAN_ALLOW
        } else {
            s.unknown_verdict
        };
    };
    // The opener still waits in open(): its /proc entry is there.
    let (process, _) = lock(&s.procs).resolve_pid(u.pid as u32);
    let pod_uid = pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default();
    let mut e = Event::new(EventKind::Read).volume(volume);
    if let Some(p) = pod {
        e = e.pod(p);
    }
    let verdict = match readers.check(&pod_uid, &process) {
        Err(Refusal(why)) => {
            e = e
                .process(process.named())
                .outcome(Outcome::Denied)
                .reason("readers")
                .detail(format!("open refused: {why} (decided after a restart)"));
            e.event = Some(EventKind::Deny);
            s.refusals.fetch_add(1, Ordering::Relaxed);
            FAN_DENY
        }
        Ok(()) => {
            e = e.process(process).detail(
                "an open the previous keybroker process was deciding when it died, allowed by this one",
            );
            FAN_ALLOW
        }
    };
    s.audit.record(e);
    verdict
}

/// A fanotify group from a descriptor this process was given (by the fd keeper, or by the
/// process that handed over): checked to be a group of the class `mode` needs (its
/// `/proc/self/fdinfo` says so) before nix wraps it.
#[allow(unsafe_code)]
fn adopt_group(fd: std::os::fd::OwnedFd, mode: Mode) -> std::io::Result<Fanotify> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("fanotify flags:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or_else(|| std::io::Error::other("the descriptor is not a fanotify group"))?;
    let class = flags & (libc::FAN_CLASS_CONTENT | libc::FAN_CLASS_PRE_CONTENT);
    if mode == Mode::Notify || class != libc::FAN_CLASS_CONTENT {
        return Err(std::io::Error::other(format!(
            "the kept group has flags {flags:#x}, not a permission group for {mode:?}"
        )));
    }
    // SAFETY: `fd` is an open fanotify group descriptor (its fdinfo says so, checked above),
    // owned by this function and moved into the wrapper, which closes it once.
    Ok(unsafe { Fanotify::from_owned_fd(fd) })
}

fn close(fd: i32) {
    if fd >= 0 {
        let _ = nix::unistd::close(fd);
    }
}

/// Whether the pidfd still names `pid` (not reaped; the pid cannot have been reused).
fn pidfd_holds(pidfd: i32, pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        })
        == Some(pid)
}

/// Which line an open waits in (see `fair`): keybroker's own, a pod's, or a process outside
/// any pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Line {
    Own,
    Pod(String),
    Pid(i32),
}

/// Events read from the kernel and not answered yet, at most this many (each holds an open
/// descriptor); the rest wait in the kernel's queue, which is unlimited in the permission
/// modes. The fairness bound holds while fewer opens than this wait at once.
const MAX_WAITING: usize = 4096;

/// One event and, in the permission modes, its opener (looked up to choose its line).
struct Queued {
    ev: RawEvent,
    process: Option<(ProcessRef, bool)>,
}

fn listen(s: &Shared) {
    let me = std::process::id() as i32;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_tick = std::time::Instant::now();
    let mut last_complaint: Option<std::time::Instant> = None;
    let mut turns: FairQueue<Line, Queued> = FairQueue::default();
    // When this listener last answered a round of opens (cleared once it has spun).
    let mut answered_at: Option<std::time::Instant> = None;
    while !s.stop.load(Ordering::Relaxed) {
        if last_tick.elapsed() >= Duration::from_secs(1) {
            lock(&s.windows).flush(&s.audit, false);
            // A queue that never drains still gets its gap recorded, up to now.
            record_gap(s, false);
            last_tick = std::time::Instant::now();
        }
        let group = s.group();
        let Some(fan) = group.as_ref() else { break };
        if s.ready.load(Ordering::Relaxed) {
            if s.has_reserved.load(Ordering::Relaxed) {
                answer_reserved(s, fan);
            }
            let held = std::mem::take(&mut *lock(&s.deferred));
            if !held.is_empty() {
                tracing::info!(
                    opens = held.len(),
                    "answering the opens that waited for this process to take its volumes back"
                );
                let held = held
                    .into_iter()
                    .map(|ev| Queued { ev, process: None })
                    .collect();
                handle_batch(s, fan, held, me);
            }
        }
        // Take in what the kernel has queued (bounded), then answer one round of it.
        let mut drained = false;
        while turns.len() < MAX_WAITING {
            match nix::unistd::read(fan, &mut buf) {
                Ok(n) => {
                    let events = parse_events(&buf[..n]);
                    if s.mode == Mode::Notify {
                        // Nobody waits on a notification: no turns to take.
                        handle_batch(
                            s,
                            fan,
                            events
                                .into_iter()
                                .map(|ev| Queued { ev, process: None })
                                .collect(),
                            me,
                        );
                    } else {
                        let mut events = events;
                        for ev in events.iter_mut().filter(|e| e.fd >= 0 && e.pid != me) {
                            ev.file = file_id(ev.fd);
                            // Before anything slower: a crash from here on leaves the next
                            // process the opener of each.
                            if let (Some(j), Some(f)) = (&s.inflight, ev.file) {
                                j.note(ev.fd, ev.pid, f.dev);
                            }
                        }
                        for ev in events {
                            let (line, process) = line_of(s, &ev, me);
                            turns.push(line, Queued { ev, process });
                        }
                    }
                    if n < buf.len() / 2 {
                        // A short read took everything there was.
                        turns.drained();
                        break;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    // Empty now: nothing can be lost before this moment, and a gap being
                    // measured ends here.
                    *lock(&s.last_empty) = SystemTime::now();
                    record_gap(s, true);
                    turns.drained();
                    drained = true;
                    break;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    complain(&mut last_complaint, "read", e);
                    break;
                }
            }
        }
        if !turns.is_empty() {
            handle_batch(s, fan, turns.round(), me);
            answered_at = Some(std::time::Instant::now());
            let f = turns.fairness();
            s.lone_waited_behind
                .store(f.lone_waited_behind, Ordering::Relaxed);
            s.widest_round.store(f.widest_round, Ordering::Relaxed);
            s.longest_line.store(f.longest_line, Ordering::Relaxed);
            continue;
        }
        if s.mode == Mode::Notify && !drained {
            // Let events gather while nobody waits on the group: an open then queues its event
            // without waking a sleeping listener, and a process's repeats merge in the queue.
            // Records are late by at most this much; readers never wait.
            drop(group);
            std::thread::sleep(NOTIFY_GATHER);
            continue;
        }
        if !drained {
            continue;
        }
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(fan),
            nix::poll::PollFlags::POLLIN,
        )];
        // Just answered a round: watch the queue a moment before sleeping (see [`SPIN`]).
        if answered_at.is_some_and(|t| t.elapsed() < SPIN) && spin_until_ready(&mut fds, SPIN) {
            continue;
        }
        answered_at = None;
        // Held opens, and opens a dead process journaled, are looked at again soon after the
        // volumes are back (their openers wait).
        let waiting = !lock(&s.deferred).is_empty() || s.has_reserved.load(Ordering::Relaxed);
        let wait: u16 = if waiting { 20 } else { 500 };
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // Never give up: in permission mode an unread event is an open that waits.
            Err(e) => complain(&mut last_complaint, "poll", e),
        }
    }
    // Stopping: what was read is answered here (the group may live on in the fd keeper, and
    // an event read here can be answered only here).
    if let Some(fan) = s.group().as_ref()
        && !turns.is_empty()
    {
        handle_batch(s, fan, turns.take_all(), me);
    }
}

/// The line an open waits in, and its opener (looked up now; `record_open` uses it).
fn line_of(s: &Shared, ev: &RawEvent, me: i32) -> (Line, Option<(ProcessRef, bool)>) {
    if ev.pid == me {
        return (Line::Own, None);
    }
    if ev.fd < 0 {
        return (Line::Pid(ev.pid), None);
    }
    let found = lock(&s.procs).resolve_pid(ev.pid as u32);
    let line = match &found.0.pod_uid {
        Some(pod) => Line::Pod(pod.clone()),
        None => Line::Pid(ev.pid),
    };
    (line, Some(found))
}

/// Logs a failing poll or read at most every 10 s, and backs off a little before retrying.
fn complain(last: &mut Option<std::time::Instant>, what: &str, e: nix::errno::Errno) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        tracing::error!(error = %e, "fanotify {what} failed; retrying (opens of tmpfs volumes are not audited meanwhile)");
        *last = Some(std::time::Instant::now());
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// How long the listener keeps looking at the queue after answering a round of opens before
/// it sleeps in `poll`. Waking a sleeping listener on another CPU is most of what a waiting
/// open costs: `benches/readers_open.rs` measured a protected open+read+close at 60 µs with
/// no spin, 30 µs with 50 µs of spin and 21 µs with everything on one CPU (FUSE: 34-41 µs).
/// A process opening files one after the other finds the listener awake; the cost is at most
/// this much CPU after each round, and none on a node where nothing opens.
const SPIN: Duration = Duration::from_micros(50);

/// Polls `fds` without sleeping for up to `spin`; true as soon as one is ready.
fn spin_until_ready(fds: &mut [nix::poll::PollFd], spin: Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < spin {
        if matches!(nix::poll::poll(fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0) {
            return true;
        }
        std::hint::spin_loop();
    }
    false
}

/// How long the notification listener lets events gather between reads.
const NOTIFY_GATHER: Duration = Duration::from_millis(2);

/// Records a batch of events; in identify mode answers each open as soon as its opener is
/// identified; in permission mode, after its record is written (or refuses it while the log
/// cannot be written).
fn handle_batch(s: &Shared, fan: &Fanotify, events: Vec<Queued>, me: i32) {
    // (event fd, verdict, keybroker's own open)
    let mut answers: Vec<(i32, u32, bool)> = Vec::new();
    let permission = s.mode == Mode::Permission;
    let may_serve = !permission || s.audit.may_serve();
    let mut recorded = false;
    for Queued { ev, process } in events {
        if ev.mask & FAN_Q_OVERFLOW_BIT != 0 {
            overflow(s);
            continue;
        }
        let is_perm = ev.mask & FAN_OPEN_PERM_BIT != 0;
        if ev.mask & (FAN_OPEN_BIT | FAN_OPEN_PERM_BIT) == 0 || ev.fd < 0 {
            close(ev.fd);
            ev.pidfd.into_iter().for_each(close);
            continue;
        }
        let verdict = if ev.pid == me {
            // keybroker's own writer and adoption.
            FAN_ALLOW
        } else {
            match record_open(s, &ev, process, may_serve) {
                Seen::Allowed(true) => {
                    recorded = true;
                    FAN_ALLOW
                }
                Seen::Allowed(false) => FAN_ALLOW,
                Seen::Refused => FAN_DENY,
                Seen::Held => {
                    // Answered once this process has its volumes back (`listen`).
                    lock(&s.deferred).push(ev);
                    continue;
                }
            }
        };
        if is_perm && !permission {
            // Identified (and its record queued): the opener goes on now.
            answer(s, fan, ev.fd, verdict);
        } else if is_perm {
            answers.push((ev.fd, verdict, ev.pid == me));
        } else {
            close(ev.fd);
        }
        ev.pidfd.into_iter().for_each(close);
    }
    if recorded && permission {
        // "Allowed only after its record is written".
        s.audit.flush();
    }
    for (fd, verdict, own) in answers {
        // A record that could not be written after all refuses the opens it stood for (never
        // keybroker's own writes).
        let verdict = if verdict == FAN_ALLOW && !own && recorded && !s.audit.healthy() {
            FAN_DENY
        } else {
            verdict
        };
        answer(s, fan, fd, verdict);
    }
}

/// Answers a permission event and closes its descriptor.
fn answer(s: &Shared, fan: &Fanotify, fd: i32, verdict: u32) {
    if let Some(j) = &s.inflight {
        j.clear(fd);
    }
    // A dead process's event with this number was read before this one: the kernel would
    // give it this answer. It gets its own first.
    if s.has_reserved.load(Ordering::Relaxed) {
        lock(&s.reserved).answer_all(s, fan, fd);
    }
    let mut resp = [0u8; 8];
    resp[..4].copy_from_slice(&fd.to_ne_bytes());
    resp[4..].copy_from_slice(&verdict.to_ne_bytes());
    if let Err(e) = nix::unistd::write(fan, &resp) {
        tracing::error!(error = %e, "cannot answer a fanotify permission event");
    }
    close(fd);
}

/// What became of one open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Allowed; `true`: a record was queued now (else counted in an open window, or not a
    /// volume's file).
    Allowed(bool),
    /// Refused (the volume's readers policy, or the log cannot be written); recorded.
    Refused,
    /// A volume this process does not know yet (it took a kept group over and has not taken
    /// its volumes back): held unanswered until it has.
    Held,
}

/// Records one open (coalesced) and decides it.
fn record_open(
    s: &Shared,
    ev: &RawEvent,
    found: Option<(ProcessRef, bool)>,
    may_serve: bool,
) -> Seen {
    let fd_path = format!("/proc/self/fd/{}", ev.fd);
    let Some(FileId { dev, ino, dir }) = ev.file.or_else(|| file_id(ev.fd)) else {
        return Seen::Allowed(false);
    };
    if dir {
        // Listing a directory is not reading a secret.
        return Seen::Allowed(false);
    }
    let (volume, pod, readers, info) = {
        let vols = lock(&s.volumes);
        let Some(w) = vols.get(&dev) else {
            if !s.ready.load(Ordering::Relaxed) {
                return Seen::Held;
            }
            // Not a watched volume (a mark being added or removed): not ours to refuse.
            return Seen::Allowed(false);
        };
        let info = w
            .current
            .get(&ino)
            .or_else(|| w.previous.get(&ino))
            .cloned()
            .or_else(|| {
                let p = std::fs::read_link(&fd_path).ok()?;
                Some(FileInfo {
                    name: name_from_path(&p.to_string_lossy())?,
                    object: String::new(),
                    version: String::new(),
                })
            });
        (w.volume.clone(), w.pod.clone(), w.readers.clone(), info)
    };
    s.opens.fetch_add(1, Ordering::Relaxed);
    let (mut process, fresh) = found.unwrap_or_else(|| lock(&s.procs).resolve_pid(ev.pid as u32));
    if fresh
        && let Some(pidfd) = ev.pidfd.filter(|p| *p >= 0)
        && !pidfd_holds(pidfd, ev.pid)
    {
        // The process was gone (and its pid possibly reused) before /proc was read: keep the
        // pid only, and do not cache what was read.
        process = ProcessRef {
            pid: ev.pid as u32,
            ..Default::default()
        };
        lock(&s.procs).forget(ev.pid as u32);
    }
    let make = |info: &Option<FileInfo>, process: ProcessRef| {
        let mut e = Event::new(EventKind::Read).volume(volume.clone());
        if let Some(p) = &pod {
            e = e.pod(p.clone());
        }
        if let Some(i) = info {
            e = e.file(i.name.clone());
            if !i.object.is_empty() {
                e = e.object(i.object.clone()).version(i.version.clone());
            }
        }
        e.process(process)
    };
    let pod_uid = pod.as_ref().map(|p| p.uid.as_str()).unwrap_or_default();
    if let Err(Refusal(why)) = readers.check(pod_uid, &process) {
        // Coalesced like reads: a scanner hammering the files costs a record a second.
        let key = (process.pid, process.uid, dev, ino, true);
        lock(&s.windows).note(&s.audit, key, || {
            let mut e = make(&info, process.named())
                .outcome(Outcome::Denied)
                .reason("readers")
                .detail(format!("open refused: {why}"));
            e.event = Some(EventKind::Deny);
            e
        });
        s.refusals.fetch_add(1, Ordering::Relaxed);
        return Seen::Refused;
    }
    if !may_serve {
        s.audit.record(
            make(&info, process)
                .outcome(Outcome::Denied)
                .detail("open refused: the audit log cannot be written"),
        );
        return Seen::Refused;
    }
    let key = (process.pid, process.uid, dev, ino, false);
    Seen::Allowed(lock(&s.windows).note(&s.audit, key, || make(&info, process)))
}

/// The kernel dropped events: opens may be missing from the time the queue was last seen
/// empty (it filled after that) until it is seen empty again (then the backlog is read).
/// The gap record is written then, or after a second if the queue never empties.
fn overflow(s: &Shared) {
    s.overflows.fetch_add(1, Ordering::Relaxed);
    let mut gap = lock(&s.gap);
    if gap.is_none() {
        *gap = Some(*lock(&s.last_empty));
    }
    tracing::error!("fanotify queue overflowed: some opens were not audited");
}

/// Writes the gap record of an overflow, spanning until now: when the queue has drained
/// (`drained`) or when the gap is a second old.
fn record_gap(s: &Shared, drained: bool) {
    let mut gap = lock(&s.gap);
    let Some(since) = *gap else { return };
    let now = SystemTime::now();
    if !drained && now.duration_since(since).unwrap_or_default() < Duration::from_secs(1) {
        return;
    }
    *gap = None;
    drop(gap);
    let volumes: Vec<String> = lock(&s.volumes)
        .values()
        .map(|w| w.volume.clone())
        .collect();
    s.audit.record(
        Event::new(EventKind::Gap)
            .outcome(Outcome::Failure)
            .detail(format!(
                "fanotify queue overflowed: opens of volumes {} between {} and {} may be missing from this log",
                volumes.join(", "),
                humantime::format_rfc3339_micros(since),
                humantime::format_rfc3339_micros(now)
            )),
    );
}

/// A tmpfs volume whose opens the node audits: every write teaches the auditor the files'
/// inodes; unmount stops watching first.
pub struct Audited {
    inner: Box<dyn Volume>,
    opens: Arc<OpenAudit>,
    root: PathBuf,
}

impl Audited {
    pub fn new(inner: Box<dyn Volume>, opens: Arc<OpenAudit>, root: PathBuf) -> Self {
        Self { inner, opens, root }
    }
}

impl Volume for Audited {
    fn kind(&self) -> VolumeKind {
        self.inner.kind()
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let changed = self.inner.apply(files)?;
        // Also after an unchanged write: a volume taken over after a restart learns its
        // inodes at its first one.
        self.opens.learn(&self.root, files);
        Ok(changed)
    }

    fn tick(&self) {
        self.inner.tick()
    }

    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        self.opens.unwatch(&self.root);
        self.inner.unmount()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(event_len: u32, mask: u64, fd: i32, pid: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&event_len.to_ne_bytes());
        b.push(FANOTIFY_METADATA_VERSION);
        b.push(0);
        b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b
    }

    #[test]
    fn events_with_and_without_a_pidfd_record() {
        let mut buf = metadata(32, FAN_OPEN_BIT, 7, 100);
        buf.extend_from_slice(&[INFO_TYPE_PIDFD, 0]);
        buf.extend_from_slice(&8u16.to_ne_bytes());
        buf.extend_from_slice(&9i32.to_ne_bytes());
        buf.extend(metadata(24, FAN_Q_OVERFLOW_BIT, -1, 0));
        let got = parse_events(&buf);
        assert_eq!(
            got,
            vec![
                RawEvent {
                    mask: FAN_OPEN_BIT,
                    fd: 7,
                    pid: 100,
                    pidfd: Some(9),
                    file: None,
                },
                RawEvent {
                    mask: FAN_Q_OVERFLOW_BIT,
                    fd: -1,
                    pid: 0,
                    pidfd: None,
                    file: None,
                },
            ]
        );
        // A truncated or foreign record ends the parse instead of being misread.
        assert!(parse_events(&buf[..20]).is_empty());
        let mut bad = metadata(24, FAN_OPEN_BIT, 3, 1);
        bad[4] = 2;
        assert!(parse_events(&bad).is_empty());
        assert!(parse_events(&metadata(400, FAN_OPEN_BIT, 3, 1)).is_empty());
    }

    /// After `stop` (a process that handed its volumes over and lives on) no open waits for
    /// the listener: the group is closed, its marks and pending events go with it.
    #[test]
    fn opens_after_stop_never_wait_for_the_stopped_listener() {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root (tmpfs mount, fanotify)");
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("t");
        std::fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some("kb-test"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(mnt.clone());
        std::fs::write(mnt.join("f"), "x").unwrap();
        let log = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
        let o = OpenAudit::start(log, Mode::Identify, None, None).unwrap();
        o.watch("v", &mnt, None, Readers::default()).unwrap();
        // Answered while the listener runs (another process's open would be recorded).
        assert_eq!(std::fs::read_to_string(mnt.join("f")).unwrap(), "x");
        o.stop();
        assert!(
            o.watch("v", &mnt, None, Readers::default()).is_err(),
            "a stopped auditor marks nothing"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let f = mnt.join("f");
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::read_to_string(f).ok());
        });
        // Only a hang detector: the read completes at once unless it waits for an answer.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60))
                .expect("the open waited for a stopped listener"),
            Some("x".to_owned())
        );
    }

    #[test]
    fn file_names_follow_the_snapshot_directory() {
        assert_eq!(
            name_from_path("/run/keybroker/staging/ab/..2026_12_01_10_00_00.1/password").as_deref(),
            Some("password")
        );
        assert_eq!(
            name_from_path("/mnt/secrets/..2026_12_01_10_00_00.1/cert/0").as_deref(),
            Some("cert/0")
        );
        assert_eq!(name_from_path("/mnt/secrets/password"), None);
        assert_eq!(name_from_path("/mnt/..2026/"), None);
    }
}
