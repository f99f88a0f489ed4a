//! The in-memory, read-only filesystem served over FUSE, with no FUSE types in it.
//!
//! Inodes are immutable: a file's inode number stands for one content. A rotation that changes a
//! file gives it a new inode and the adapter invalidates the kernel's directory entry, so the
//! kernel may keep every file's pages cached for as long as it likes (no stale page can ever be
//! served), and a reader's open file keeps the content it opened (each open pins one version).
//! Replaced inodes live on until the kernel forgets them.
//!
//! A restarted daemon takes a live FUSE session over with [`MemFs::restore`]: the kernel still
//! refers to the previous process's inode numbers, so the (non-secret) inode table is recorded
//! at every change ([`MemFs::on_table`]) and the old numbers answer for the current content of
//! their names ([`InodeTable`]).
//!
//! Every open is audited with the calling process (thread id resolved to pid, command, pod),
//! uid and gid, coalesced per process and file version (`volume::opens`; flushed by
//! [`MemFs::flush_reads`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::access::{Readers, Refusal};
use crate::audit::{AuditLog, Event, EventKind, Outcome};
use crate::procinfo::ProcCache;
use crate::secret::SecretBytes;
use crate::volume::Owner;
use crate::volume::content::RenderedFile;
use crate::volume::opens::OpenWindows;

pub const ROOT_INO: u64 = 1;
pub use crate::volume::opens::READ_WINDOW;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
}

/// Attributes of one inode, in the filesystem's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

/// Why an operation failed; mapped to an errno in exactly one place (the FUSE adapter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only volume")]
    ReadOnly,
    #[error("unknown file handle")]
    BadHandle,
    /// An inode this filesystem does not know (forgotten, or handed out by a previous process
    /// whose inode table is lost): the kernel looks the name up again and retries.
    #[error("stale inode")]
    Stale,
    #[error("serving is paused: the audit log cannot be written")]
    AuditDown,
    /// The volume's readers policy refuses the opener (`access::Readers`).
    #[error("the volume's readers policy refuses this process")]
    Refused,
}

/// Who is asking (from the FUSE request header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
pub struct FileNode {
    ino: u64,
    name: String,
    perm: u16,
    bytes: SecretBytes,
    object: String,
    version: String,
    mtime: SystemTime,
}

impl FileNode {
    pub fn bytes(&self) -> &[u8] {
        self.bytes.expose()
    }
}

/// The names behind every inode number the kernel may hold: what a restarted daemon needs to
/// answer for the previous one's inodes. Names only (they are what `readdir` shows); inode
/// numbers are counters, never derived from content.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InodeTable {
    pub next_ino: u64,
    /// (inode, file name) of every file inode, current or still referenced.
    pub files: Vec<(u64, String)>,
    /// (inode, name) of the subdirectories.
    pub dirs: Vec<(u64, String)>,
}

impl InodeTable {
    /// A table for a session whose previous table is lost (a damaged record): no alias, and
    /// new inodes numbered far above any a process could have handed out (the time in
    /// microseconds), so a stale number the kernel still holds never names a new file.
    pub fn fresh() -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1 << 50);
        Self {
            next_ino: now.max(1 << 40),
            files: Vec::new(),
            dirs: Vec::new(),
        }
    }
}

type TableHook = Box<dyn Fn(&InodeTable) + Send + Sync>;

struct State {
    /// Inodes of a previous process (after [`MemFs::restore`]): they answer for the current
    /// content of their name.
    aliases: HashMap<u64, String>,
    /// Files by name; a file in a subdirectory (a version of `objectVersionHistory`) is named
    /// `dir/leaf`.
    dir: BTreeMap<String, Arc<FileNode>>,
    /// Subdirectories of the root (one level) and their inode numbers.
    subdirs: BTreeMap<String, u64>,
    /// Every inode the kernel may still refer to, with its lookup count.
    inodes: HashMap<u64, (Arc<FileNode>, u64)>,
    next_ino: u64,
    mtime: SystemTime,
}

pub struct MemFs {
    volume: Arc<str>,
    owner: Owner,
    audit: Option<AuditLog>,
    state: RwLock<State>,
    handles: Mutex<HashMap<u64, Arc<FileNode>>>,
    next_fh: AtomicU64,
    procs: Mutex<ProcCache>,
    reads: Mutex<OpenWindows<ReadKey>>,
    on_table: std::sync::OnceLock<TableHook>,
    /// The pod whose volume this is (node mode): its reads name it, so a reader outside it
    /// shows.
    pod: Option<crate::audit::PodRef>,
    /// Who may open the files (node mode; the default admits everyone).
    readers: Readers,
}

/// (pid, uid, inode, refused): an inode is one version of one file.
type ReadKey = (u32, u32, u64, bool);

impl std::fmt::Debug for MemFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFs")
            .field("volume", &self.volume)
            .finish_non_exhaustive()
    }
}

impl MemFs {
    pub fn new(volume: &str, owner: Owner, audit: Option<AuditLog>) -> Self {
        Self::restore(volume, owner, audit, InodeTable::default())
    }

    /// A filesystem that answers for the inodes of `table` (a previous process's): each old
    /// file inode serves the current content of its name, subdirectories keep their numbers,
    /// new inodes are numbered after the old ones.
    pub fn restore(volume: &str, owner: Owner, audit: Option<AuditLog>, table: InodeTable) -> Self {
        // File handles carry a random generation in their high bits, so a handle the kernel
        // got from a previous process is never mistaken for one of ours.
        let generation = fastrand::u64(1..1 << 23);
        Self {
            volume: Arc::from(volume),
            owner,
            audit,
            state: RwLock::new(State {
                aliases: table.files.into_iter().collect(),
                dir: BTreeMap::new(),
                subdirs: table.dirs.into_iter().map(|(i, n)| (n, i)).collect(),
                inodes: HashMap::new(),
                next_ino: table.next_ino.max(ROOT_INO + 1),
                mtime: SystemTime::now(),
            }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new((generation << 40) + 1),
            procs: Mutex::new(ProcCache::default()),
            reads: Mutex::new(OpenWindows::default()),
            on_table: std::sync::OnceLock::new(),
            pod: None,
            readers: Readers::default(),
        }
    }

    /// The pod whose volume this is: every read record names it.
    pub fn with_pod(mut self, pod: crate::audit::PodRef) -> Self {
        self.pod = Some(pod);
        self
    }

    /// Only `readers` may open the files: others get [`FsError::Refused`] (EACCES) and a
    /// `deny` record. Set before the filesystem serves (also when it takes a session over).
    pub fn with_readers(mut self, readers: Readers) -> Self {
        self.readers = readers;
        self
    }

    /// Calls `hook` with the inode table now and whenever it changes, before the kernel can
    /// see a new inode (the caller records it for the next process).
    pub fn on_table(&self, hook: impl Fn(&InodeTable) + Send + Sync + 'static) {
        let st = self.state();
        hook(&Self::table_of(&st));
        let _ = self.on_table.set(Box::new(hook));
    }

    fn table_of(st: &State) -> InodeTable {
        let mut files: Vec<(u64, String)> = st
            .inodes
            .iter()
            .map(|(ino, (n, _))| (*ino, n.name.clone()))
            .chain(st.aliases.iter().map(|(i, n)| (*i, n.clone())))
            .collect();
        files.sort();
        InodeTable {
            next_ino: st.next_ino,
            files,
            dirs: st.subdirs.iter().map(|(n, i)| (*i, n.clone())).collect(),
        }
    }

    /// The previous process's inodes: (inode, parent inode, name in the parent), for the
    /// adapter to invalidate after a takeover.
    pub fn aliases(&self) -> Vec<(u64, u64, String)> {
        let st = self.state();
        st.aliases
            .iter()
            .map(|(ino, name)| match name.split_once('/') {
                Some((d, leaf)) => (
                    *ino,
                    st.subdirs.get(d).copied().unwrap_or(ROOT_INO),
                    leaf.to_owned(),
                ),
                None => (*ino, ROOT_INO, name.clone()),
            })
            .collect()
    }

    /// The node `ino` stands for: its own, or (a previous process's inode) its name's current.
    fn node_of(st: &State, ino: u64) -> Option<Arc<FileNode>> {
        match st.inodes.get(&ino) {
            Some((n, _)) => Some(n.clone()),
            None => st
                .aliases
                .get(&ino)
                .and_then(|name| st.dir.get(name).cloned()),
        }
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<FileNode>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the content. Files whose bytes and mode are unchanged keep their inode.
    /// Returns the names whose directory entry changed.
    pub fn apply(&self, files: &[RenderedFile]) -> Vec<String> {
        let now = SystemTime::now();
        let mut st = self.state_mut();
        let mut changed = Vec::new();
        let mut dir = BTreeMap::new();
        for f in files {
            let name = f.name.as_str().to_owned();
            let perm = (f.mode & 0o777) as u16;
            match st.dir.get(&name) {
                Some(old) if old.bytes == f.bytes && old.perm == perm => {
                    dir.insert(name, old.clone());
                }
                _ => {
                    let ino = st.next_ino;
                    st.next_ino += 1;
                    let node = Arc::new(FileNode {
                        ino,
                        name: name.clone(),
                        perm,
                        bytes: f.bytes.clone(),
                        object: f.object.clone(),
                        version: f.version.clone(),
                        mtime: now,
                    });
                    st.inodes.insert(ino, (node.clone(), 0));
                    changed.push(name.clone());
                    dir.insert(name, node);
                }
            }
        }
        for gone in st.dir.keys().filter(|n| !dir.contains_key(*n)) {
            changed.push(gone.clone());
        }
        // Subdirectories keep their inode while they have files.
        let mut subdirs = BTreeMap::new();
        for name in dir.keys() {
            if let Some((d, _)) = name.split_once('/')
                && !subdirs.contains_key(d)
            {
                let ino = match st.subdirs.get(d) {
                    Some(ino) => *ino,
                    None => {
                        let ino = st.next_ino;
                        st.next_ino += 1;
                        changed.push(d.to_owned());
                        ino
                    }
                };
                subdirs.insert(d.to_owned(), ino);
            }
        }
        for gone in st.subdirs.keys().filter(|d| !subdirs.contains_key(*d)) {
            changed.push(gone.clone());
        }
        st.subdirs = subdirs;
        if !changed.is_empty() {
            st.mtime = now;
        }
        st.dir = dir;
        // Replaced inodes the kernel never looked up can go now.
        let State { dir, inodes, .. } = &mut *st;
        inodes.retain(|_, (node, n)| {
            *n > 0 || dir.get(&node.name).is_some_and(|d| d.ino == node.ino)
        });
        if !changed.is_empty()
            && let Some(hook) = self.on_table.get()
        {
            // Still under the write lock: no lookup sees a new inode before it is recorded.
            hook(&Self::table_of(&st));
        }
        changed
    }

    fn file_attr(&self, n: &FileNode) -> Attr {
        Attr {
            ino: n.ino,
            kind: NodeKind::File,
            size: n.bytes.len() as u64,
            perm: n.perm,
            nlink: 1,
            uid: self.owner.uid,
            gid: self.owner.gid,
            mtime: n.mtime,
        }
    }

    fn dir_attr(&self, st: &State, ino: u64) -> Attr {
        Attr {
            ino,
            ..self.root_attr(st)
        }
    }

    /// The subdirectory with inode `ino`.
    fn subdir_name(st: &State, ino: u64) -> Option<&str> {
        st.subdirs
            .iter()
            .find(|(_, i)| **i == ino)
            .map(|(n, _)| n.as_str())
    }

    /// Where a changed name sits: (parent inode, name in it) and, for a file in a
    /// subdirectory, the subdirectory's inode (for the FUSE adapter's invalidations).
    pub fn entry_of(&self, name: &str) -> (u64, String) {
        let st = self.state();
        match name.split_once('/') {
            Some((d, leaf)) => match st.subdirs.get(d) {
                Some(ino) => (*ino, leaf.to_owned()),
                None => (ROOT_INO, d.to_owned()),
            },
            None => (ROOT_INO, name.to_owned()),
        }
    }

    fn root_attr(&self, st: &State) -> Attr {
        Attr {
            ino: ROOT_INO,
            kind: NodeKind::Dir,
            size: 0,
            perm: 0o555,
            nlink: 2,
            uid: self.owner.uid,
            gid: self.owner.gid,
            mtime: st.mtime,
        }
    }

    /// Looks `name` up in the root or a subdirectory and counts the kernel's reference.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let mut st = self.state_mut();
        let full = if parent == ROOT_INO {
            if name.contains('/') {
                return Err(FsError::NotFound);
            }
            if !st.dir.contains_key(name)
                && let Some(ino) = st.subdirs.get(name).copied()
            {
                return Ok(self.dir_attr(&st, ino));
            }
            name.to_owned()
        } else if let Some(d) = Self::subdir_name(&st, parent) {
            format!("{d}/{name}")
        } else {
            return Err(if st.inodes.contains_key(&parent) {
                FsError::NotDir
            } else {
                FsError::Stale
            });
        };
        let node = st.dir.get(&full).cloned().ok_or(FsError::NotFound)?;
        let entry = st
            .inodes
            .entry(node.ino)
            .or_insert_with(|| (node.clone(), 0));
        entry.1 += 1;
        Ok(self.file_attr(&node))
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.state_mut();
        // The kernel forgets an inode with all its lookups at once: a previous process's goes.
        st.aliases.remove(&ino);
        let State { dir, inodes, .. } = &mut *st;
        if let Some((node, count)) = inodes.get_mut(&ino) {
            *count = count.saturating_sub(n);
            let current = dir.get(&node.name).is_some_and(|d| d.ino == ino);
            if *count == 0 && !current {
                inodes.remove(&ino);
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let st = self.state();
        if ino == ROOT_INO {
            return Ok(self.root_attr(&st));
        }
        if Self::subdir_name(&st, ino).is_some() {
            return Ok(self.dir_attr(&st, ino));
        }
        Self::node_of(&st, ino)
            .map(|n| Attr {
                ino,
                ..self.file_attr(&n)
            })
            .ok_or(FsError::Stale)
    }

    /// Opens a file for reading, pinning its content, and audits the read.
    pub fn open(&self, ino: u64, write: bool, caller: Caller) -> Result<u64, FsError> {
        if ino == ROOT_INO || Self::subdir_name(&self.state(), ino).is_some() {
            return Err(FsError::IsDir);
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        if let Some(a) = &self.audit
            && !a.may_serve()
        {
            return Err(FsError::AuditDown);
        }
        let node = Self::node_of(&self.state(), ino).ok_or(FsError::Stale)?;
        if self.audit.is_none() && !self.readers.enforced() {
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.handles().insert(fh, node);
            return Ok(fh);
        }
        // Resolved here, while the caller is certainly alive (a short-lived `cat` is gone by
        // the time a background thread would look); cached per thread id, so only a process's
        // first open pays for reading /proc.
        let process = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resolve(caller.tid, caller.uid, caller.gid);
        let pod_uid = self
            .pod
            .as_ref()
            .map(|p| p.uid.as_str())
            .unwrap_or_default();
        let refused = self.readers.check(pod_uid, &process).err();
        if let Some(a) = &self.audit {
            // Refusals are coalesced like reads: a scanner hammering the files costs the log
            // a record a second.
            let key = (process.pid, caller.uid, ino, refused.is_some());
            self.reads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(a, key, || {
                    let mut e = Event::new(EventKind::Read)
                        .volume(&*self.volume)
                        .file(node.name.clone())
                        .object(node.object.clone())
                        .version(node.version.clone())
                        .process(if refused.is_some() {
                            process.named()
                        } else {
                            process
                        });
                    if let Some(Refusal(why)) = &refused {
                        e = e
                            .outcome(Outcome::Denied)
                            .reason("readers")
                            .detail(format!("open refused: {why}"));
                        e.event = Some(EventKind::Deny);
                    }
                    match &self.pod {
                        Some(p) => e.pod(p.clone()),
                        None => e,
                    }
                });
        }
        if refused.is_some() {
            return Err(FsError::Refused);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, node);
        Ok(fh)
    }

    /// The pinned content of an open file.
    pub fn handle(&self, fh: u64) -> Result<Arc<FileNode>, FsError> {
        self.handles().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// What a read of `fh` on inode `ino` returns: the content the open pinned, or, for a
    /// handle a previous process opened (after a takeover), the inode's current content.
    pub fn read_node(&self, fh: u64, ino: u64) -> Result<Arc<FileNode>, FsError> {
        if let Some(n) = self.handles().get(&fh) {
            return Ok(n.clone());
        }
        Self::node_of(&self.state(), ino).ok_or(FsError::BadHandle)
    }

    pub fn release(&self, fh: u64) {
        self.handles().remove(&fh);
    }

    /// Entries of the root directory, with "." and "..".
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, NodeKind, String)>, FsError> {
        let st = self.state();
        if ino != ROOT_INO {
            let Some(d) = Self::subdir_name(&st, ino) else {
                return Err(if st.inodes.contains_key(&ino) {
                    FsError::NotDir
                } else {
                    FsError::NotFound
                });
            };
            let prefix = format!("{d}/");
            let mut out = vec![
                (ino, NodeKind::Dir, ".".to_owned()),
                (ROOT_INO, NodeKind::Dir, "..".to_owned()),
            ];
            out.extend(st.dir.values().filter_map(|n| {
                n.name
                    .strip_prefix(&prefix)
                    .map(|leaf| (n.ino, NodeKind::File, leaf.to_owned()))
            }));
            return Ok(out);
        }
        let mut out = vec![
            (ROOT_INO, NodeKind::Dir, ".".to_owned()),
            (ROOT_INO, NodeKind::Dir, "..".to_owned()),
        ];
        out.extend(
            st.dir
                .values()
                .filter(|n| !n.name.contains('/'))
                .map(|n| (n.ino, NodeKind::File, n.name.clone())),
        );
        out.extend(
            st.subdirs
                .iter()
                .map(|(d, ino)| (*ino, NodeKind::Dir, d.clone())),
        );
        Ok(out)
    }

    /// Records the opens counted in read windows that have closed (all of them when `all`).
    /// Called about once a second and at unmount.
    /// Records an event about the volume's life (not a read), e.g. how its session ended.
    pub fn audit_note(&self, detail: String) {
        if let Some(a) = &self.audit {
            a.record(
                Event::new(EventKind::Unmount)
                    .volume(&*self.volume)
                    .detail(detail),
            );
        }
    }

    pub fn flush_reads(&self, all: bool) {
        let Some(a) = &self.audit else { return };
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(a, all);
    }

    /// Number of open file handles (for leak checks).
    pub fn open_handles(&self) -> usize {
        self.handles().len()
    }
}

/// The slice of `data` a read at `offset` of `size` bytes returns.
pub fn read_range(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, v: &str, mode: u32) -> RenderedFile {
        RenderedFile::for_test(name, v, mode)
    }

    const ME: Caller = Caller {
        tid: 1,
        uid: 0,
        gid: 0,
    };

    #[test]
    fn an_open_file_keeps_its_version_across_a_rotation() {
        let fs = MemFs::new("v", Owner { uid: 0, gid: 0 }, None);
        assert_eq!(
            fs.apply(&[file("a", "one", 0o440), file("b", "x", 0o400)]),
            ["a", "b"]
        );
        let a1 = fs.lookup(ROOT_INO, "a").unwrap();
        assert_eq!((a1.size, a1.perm), (3, 0o440));
        let fh = fs.open(a1.ino, false, ME).unwrap();
        // Rotation: only "a" changes; it gets a new inode; "b" keeps its own.
        let b1 = fs.lookup(ROOT_INO, "b").unwrap().ino;
        assert_eq!(
            fs.apply(&[file("a", "two!", 0o440), file("b", "x", 0o400)]),
            ["a"]
        );
        assert_eq!(fs.handle(fh).unwrap().bytes(), b"one");
        let a2 = fs.lookup(ROOT_INO, "a").unwrap();
        assert_ne!(a2.ino, a1.ino);
        assert_eq!(a2.size, 4);
        assert_eq!(fs.lookup(ROOT_INO, "b").unwrap().ino, b1);
        // The old inode is still answerable until the kernel forgets it.
        assert_eq!(fs.getattr(a1.ino).unwrap().size, 3);
        fs.forget(a1.ino, 1);
        assert_eq!(fs.getattr(a1.ino), Err(FsError::Stale));
        fs.release(fh);
        assert_eq!(fs.open_handles(), 0);
    }

    #[test]
    fn unchanged_content_changes_nothing_and_removal_is_reported() {
        let fs = MemFs::new("v", Owner { uid: 0, gid: 0 }, None);
        fs.apply(&[file("a", "one", 0o440), file("b", "x", 0o400)]);
        assert!(
            fs.apply(&[file("a", "one", 0o440), file("b", "x", 0o400)])
                .is_empty()
        );
        assert_eq!(fs.apply(&[file("a", "one", 0o440)]), ["b"]);
        assert_eq!(fs.lookup(ROOT_INO, "b"), Err(FsError::NotFound));
        // A mode change alone is a change.
        assert_eq!(fs.apply(&[file("a", "one", 0o400)]), ["a"]);
    }

    #[test]
    fn writes_directories_and_bad_handles_are_refused() {
        let fs = MemFs::new("v", Owner { uid: 0, gid: 0 }, None);
        fs.apply(&[file("a", "one", 0o440)]);
        let a = fs.lookup(ROOT_INO, "a").unwrap().ino;
        assert_eq!(fs.open(a, true, ME), Err(FsError::ReadOnly));
        assert_eq!(fs.open(ROOT_INO, false, ME), Err(FsError::IsDir));
        assert_eq!(fs.lookup(a, "x"), Err(FsError::NotDir));
        assert_eq!(fs.handle(999).err(), Some(FsError::BadHandle));
        let names: Vec<String> = fs
            .readdir(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|e| e.2)
            .collect();
        assert_eq!(names, [".", "..", "a"]);
    }

    #[test]
    fn repeated_opens_are_coalesced_and_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.jsonl");
        let audit = AuditLog::open(&log, false).unwrap();
        let fs = MemFs::new("v", Owner { uid: 0, gid: 0 }, Some(audit.clone()));
        fs.apply(&[file("a", "one", 0o440)]);
        let a = fs.lookup(ROOT_INO, "a").unwrap().ino;
        let me = Caller {
            tid: std::process::id(),
            uid: 0,
            gid: 0,
        };
        for _ in 0..50 {
            let fh = fs.open(a, false, me).unwrap();
            fs.release(fh);
        }
        fs.flush_reads(true);
        audit.flush();
        let recs: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            recs.len(),
            2,
            "first open at once, the rest as one counted record"
        );
        assert!(recs[0]["count"].is_null());
        assert_eq!(recs[1]["count"], 49);
        assert!(recs[1]["first_time"].is_string());
        let opens: u64 = recs.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum();
        assert_eq!(opens, 50);
    }

    #[test]
    fn a_restored_filesystem_answers_for_the_previous_inodes() {
        let old = MemFs::new("v", Owner { uid: 0, gid: 0 }, None);
        let table = Arc::new(Mutex::new(InodeTable::default()));
        let t = table.clone();
        old.on_table(move |tb| *t.lock().unwrap() = tb.clone());
        let mut nested = file("x", "xx", 0o440);
        nested.name = crate::volume::content::FileName::in_dir(&nested.name, 0);
        let nested_name = nested.name.as_str().to_owned();
        let leaf = nested_name.split_once('/').unwrap().1.to_owned();
        old.apply(&[file("a", "one", 0o440), nested.clone()]);
        let a1 = old.lookup(ROOT_INO, "a").unwrap().ino;
        let d = old.lookup(ROOT_INO, "x").unwrap().ino;
        let old_fh = old.open(a1, false, ME).unwrap();
        let recorded = table.lock().unwrap().clone();
        assert!(recorded.files.iter().any(|(i, n)| *i == a1 && n == "a"));
        assert_eq!(recorded.dirs, [(d, "x".to_owned())]);
        assert!(!format!("{recorded:?}").contains("one"), "names only");

        // The next process: content rendered anew (rotated meanwhile), old numbers answered.
        let new = MemFs::restore("v", Owner { uid: 0, gid: 0 }, None, recorded.clone());
        new.apply(&[file("a", "two!", 0o440), nested]);
        let a2 = new.lookup(ROOT_INO, "a").unwrap();
        assert!(
            a2.ino >= recorded.next_ino,
            "new inodes never reuse old numbers"
        );
        assert_eq!(
            new.lookup(ROOT_INO, "x").unwrap().ino,
            d,
            "directories keep theirs"
        );
        let old_attr = new.getattr(a1).unwrap();
        assert_eq!((old_attr.ino, old_attr.size), (a1, 4));
        // A handle the previous process gave the kernel reads the current content.
        assert_eq!(new.read_node(old_fh, a1).unwrap().bytes(), b"two!");
        let fh = new.open(a1, false, ME).unwrap();
        assert_ne!(fh, old_fh);
        assert_eq!(new.read_node(fh, a1).unwrap().bytes(), b"two!");
        let mut aliases = new.aliases();
        aliases.sort();
        assert!(aliases.contains(&(a1, ROOT_INO, "a".to_owned())));
        assert!(aliases.iter().any(|(_, p, n)| *p == d && *n == leaf));
        new.forget(a1, 7);
        assert_eq!(new.getattr(a1), Err(FsError::Stale));
    }

    #[test]
    fn read_range_is_bounded() {
        assert_eq!(read_range(b"hello", 0, 100), b"hello");
        assert_eq!(read_range(b"hello", 3, 1), b"l");
        assert_eq!(read_range(b"hello", 9, 4), b"");
        assert_eq!(read_range(b"hello", u64::MAX, u32::MAX), b"");
    }
}
