//! Mount targets: what is mounted at a directory, whether its server is alive, and cleaning up
//! after a keybroker that was killed.
//!
//! Liveness of a previous keybroker is decided by a lock (flock) it held on a per-target lock
//! file, not by guessing from the mount table: the kernel releases the lock when the process
//! dies, however it dies.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::MntFlags;
use sha2::{Digest, Sha256};

use super::VolumeError;

/// One line of /proc/self/mountinfo, the fields keybroker needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The filesystem's device (`major:minor`): every bind mount of one tmpfs shares it.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Decodes the octal escapes mountinfo uses for spaces and the like (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let dev = pre.split(' ').nth(2)?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fs_type = post.next()?;
            let source = post.next().unwrap_or("");
            Some(MountEntry {
                dev: dev.to_owned(),
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_owned(),
                source: unescape(source),
            })
        })
        .collect()
}

/// The topmost mount at `dir`, if `dir` is a mount point.
pub fn mount_at(dir: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == dir)
}

/// Whether a mount entry is one keybroker made.
pub fn is_keybroker_mount(m: &MountEntry) -> bool {
    m.fs_type == "fuse.keybroker" || m.source == "keybroker"
}

/// A held claim on a mount target; released when dropped or when the process dies.
#[derive(Debug)]
pub struct TargetLock {
    _lock: Flock<File>,
    path: PathBuf,
    lock_path: PathBuf,
}

impl Drop for TargetLock {
    /// The lock file goes while still locked (a process that opened it meanwhile finds, once
    /// it holds the lock, that the path no longer names its file, and opens it anew): clean
    /// exits leave nothing in the runtime directory.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

impl TargetLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// keybroker's runtime state directory (lock files, tmpfs staging mounts): memory-backed
/// /run for root, the user's runtime directory otherwise.
fn runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/keybroker")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("keybroker")
    }
}

fn target_key(canonical: &Path) -> String {
    hex::encode(&Sha256::digest(canonical.as_os_str().as_encoded_bytes())[..12])
}

/// Where `keybroker mount` keeps its tmpfs staging mounts (the node keeps its own under its
/// state directory, so two node processes never share one).
pub fn default_staging_root() -> PathBuf {
    runtime_dir().join("staging")
}

/// Where the tmpfs behind a target is mounted read-write, under `root`; the target itself is a
/// read-only bind of it. Derived from the target so a restarted keybroker finds it again.
pub fn staging_dir(root: &Path, canonical_target: &Path) -> PathBuf {
    root.join(target_key(canonical_target))
}

/// The name [`staging_dir`] gives a target's staging directory under its root.
pub fn staging_name(canonical_target: &Path) -> String {
    target_key(canonical_target)
}

/// Staging mounts under `root` that belong to none of `keep` (staging names): a crash inside
/// an unpublish (the record went first) leaves one behind, bound at a target kubelet may still
/// see. Each is detached together with every other keybroker mount of the same tmpfs (its
/// target binds in this mount namespace), and its directory removed. Returns the staging
/// directories cleaned and how many mounts were detached.
pub fn detach_orphan_staging(
    root: &Path,
    keep: &std::collections::BTreeSet<String>,
) -> (Vec<PathBuf>, usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return (Vec::new(), 0);
    };
    let mut cleaned = Vec::new();
    let mut detached = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let dir = e.path();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default();
        if let Some(m) = mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == dir && is_keybroker_mount(m))
        {
            // Its binds first (deepest last mounted first), then the staging mount itself.
            for b in mounts
                .iter()
                .rev()
                .filter(|b| b.dev == m.dev && b.mount_point != dir && is_keybroker_mount(b))
            {
                detached += detach_keybroker_mounts(&b.mount_point);
            }
            detached += detach_keybroker_mounts(&dir);
        }
        if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
            cleaned.push(dir);
        }
    }
    (cleaned, detached)
}

/// Claims `dir` for this process, and if a keybroker that is no longer running left a mount
/// there, unmounts it (saying so). `dir` is created when missing. Returns the claim and whether
/// a stale mount was cleaned.
pub fn claim(dir: &Path) -> Result<(TargetLock, bool), VolumeError> {
    let target_err = |e: String| VolumeError::Target {
        path: dir.to_owned(),
        error: e,
    };
    // A dead FUSE server makes stat fail with ENOTCONN; create_dir_all would fail too.
    let dead_fuse =
        matches!(std::fs::metadata(dir), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if !dead_fuse {
        std::fs::create_dir_all(dir).map_err(|e| target_err(e.to_string()))?;
    }
    let canonical = if dead_fuse {
        std::path::absolute(dir).map_err(|e| target_err(e.to_string()))?
    } else {
        dir.canonicalize().map_err(|e| target_err(e.to_string()))?
    };
    let locks = runtime_dir().join("targets");
    std::fs::create_dir_all(&locks)
        .map_err(|e| target_err(format!("cannot create {}: {e}", locks.display())))?;
    let lock_path = locks.join(format!("{}.lock", target_key(&canonical)));
    let mut lock = loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| target_err(format!("cannot open {}: {e}", lock_path.display())))?;
        let l = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(VolumeError::Busy {
                    path: canonical,
                    pid: pid.trim().to_owned(),
                });
            }
        };
        // The holder before us may have removed the file as it let go: ours must still be
        // the one the path names.
        use std::os::unix::fs::MetadataExt;
        let same = match (l.metadata(), std::fs::metadata(&lock_path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            break l;
        }
    };
    let _ = lock.set_len(0);
    let _ = lock.rewind();
    let _ = write!(lock, "{}", std::process::id());
    // Held from here: any error below lets go of the target and removes the lock file.
    let claim = TargetLock {
        _lock: lock,
        path: canonical.clone(),
        lock_path,
    };

    // Nobody alive holds the target: anything keybroker left mounted there is stale.
    let mut cleaned = false;
    while let Some(m) = mount_at(&canonical).filter(is_keybroker_mount) {
        tracing::warn!(
            target_dir = %canonical.display(),
            fs_type = %m.fs_type,
            "found a mount left by a keybroker that is no longer running; unmounting it"
        );
        nix::mount::umount2(&canonical, MntFlags::MNT_DETACH)
            .map_err(|e| target_err(format!("cannot unmount the stale mount: {e}")))?;
        cleaned = true;
    }
    let staging = staging_dir(&default_staging_root(), &canonical);
    while mount_at(&staging).is_some_and(|m| is_keybroker_mount(&m)) {
        nix::mount::umount2(&staging, MntFlags::MNT_DETACH).map_err(|e| {
            target_err(format!(
                "cannot unmount the stale staging tmpfs {}: {e}",
                staging.display()
            ))
        })?;
    }
    if dead_fuse && !cleaned {
        return Err(target_err(
            "a dead FUSE mount is there that keybroker did not make; unmount it with `fusermount3 -u`".into(),
        ));
    }
    if let Some(m) = mount_at(&canonical) {
        return Err(target_err(format!(
            "a {} filesystem is already mounted there",
            m.fs_type
        )));
    }
    Ok((claim, cleaned))
}

/// Detaches every keybroker mount at `dir`, however many are stacked (a crash can leave a
/// second one on top of the first). Returns how many were detached.
pub fn detach_keybroker_mounts(dir: &Path) -> usize {
    let mut n = 0;
    while mount_at(dir).is_some_and(|m| is_keybroker_mount(&m)) {
        if nix::mount::umount2(dir, MntFlags::MNT_DETACH).is_err() {
            break;
        }
        n += 1;
    }
    n
}

/// Why a publish target cannot be used. Messages name the target and the rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("target {path} {rule}")]
pub struct TargetRefused {
    pub path: PathBuf,
    pub rule: String,
}

/// What [`prepare_target`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Keybroker mounts detached from the target and its staging directory: a previous
    /// process's publish that crashed before it was recorded, or stacked mounts.
    pub orphans_cleaned: usize,
    /// The target directory was created here (so unpublish may remove it).
    pub created: bool,
}

/// Makes `target` ready for a new mount of this process: keybroker mounts left there by a
/// crash are detached (with the tmpfs staging mount behind them), and the target must then be
/// an empty directory that is not a symlink and not a mount point. A missing target is created
/// beneath a parent opened without following a symlink.
pub fn prepare_target(target: &Path, staging_root: &Path) -> Result<Prepared, TargetRefused> {
    use nix::fcntl::{AtFlags, OFlag, open, openat};
    use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
    let refuse = |rule: String| TargetRefused {
        path: target.to_owned(),
        rule,
    };
    let mut prepared = Prepared::default();
    let staging = staging_dir(staging_root, target);
    // A path that does not exist has nothing mounted on it (a mount point cannot be removed
    // while mounted): a fresh publish, the common case, needs no look at the mount table, whose
    // size grows with every volume on the node. Otherwise one read; again only when orphans
    // had to be detached.
    let absent = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let mounts = if absent(target) && absent(&staging) {
        Vec::new()
    } else {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default()
    };
    let top = |dir: &Path| mounts.iter().rev().find(|m| m.mount_point == dir).cloned();
    let mut at_target = top(target);
    if at_target.as_ref().is_some_and(is_keybroker_mount)
        || top(&staging).as_ref().is_some_and(is_keybroker_mount)
    {
        prepared.orphans_cleaned =
            detach_keybroker_mounts(target) + detach_keybroker_mounts(&staging);
        at_target = mount_at(target);
    }
    let _ = std::fs::remove_dir(&staging);
    if let Some(m) = at_target {
        return Err(refuse(format!(
            "already has a {} filesystem mounted that keybroker did not make",
            m.fs_type
        )));
    }
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(refuse("has no parent directory".into()));
    };
    // The parent's own path is kubelet's (its pods directory); create what is missing.
    std::fs::create_dir_all(parent)
        .map_err(|e| refuse(format!("cannot have its parent directory created: {e}")))?;
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let parent_fd = open(parent, dir_flags, Mode::empty()).map_err(|e| {
        refuse(match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                "has a parent that is a symlink or not a directory".into()
            }
            e => format!("cannot have its parent directory opened: {e}"),
        })
    })?;
    match fstatat(&parent_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::errno::Errno::ENOENT) => {
            mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o750))
                .map_err(|e| refuse(format!("cannot be created: {e}")))?;
            prepared.created = true;
            Ok(prepared)
        }
        Err(e) => Err(refuse(format!("cannot be inspected: {e}"))),
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                return Err(refuse("is a symlink; it must be a directory".into()));
            }
            if kind != SFlag::S_IFDIR {
                return Err(refuse("is not a directory".into()));
            }
            let fd = openat(&parent_fd, name, dir_flags, Mode::empty())
                .map_err(|e| refuse(format!("cannot be opened: {e}")))?;
            let mut dir =
                nix::dir::Dir::from_fd(fd).map_err(|e| refuse(format!("cannot be listed: {e}")))?;
            let non_empty = dir.iter().flatten().any(|e| {
                let n = e.file_name().to_bytes();
                n != b"." && n != b".."
            });
            if non_empty {
                return Err(refuse(
                    "is not an empty directory; keybroker does not mount over files".into(),
                ));
            }
            Ok(prepared)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_staging() -> PathBuf {
        std::env::temp_dir().join("keybroker-test-staging-unused")
    }

    #[test]
    fn targets_must_be_empty_real_directories() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("pods/uid/mount");
        assert_eq!(
            prepare_target(&fresh, &tmp_staging()).unwrap(),
            Prepared {
                orphans_cleaned: 0,
                created: true
            }
        );
        assert!(!prepare_target(&fresh, &tmp_staging()).unwrap().created);
        std::fs::write(fresh.join("f"), "x").unwrap();
        assert!(
            prepare_target(&fresh, &tmp_staging())
                .unwrap_err()
                .rule
                .contains("not an empty directory")
        );
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("pods"), &link).unwrap();
        assert!(
            prepare_target(&link, &tmp_staging())
                .unwrap_err()
                .rule
                .contains("symlink")
        );
        // A parent that is a symlink is not followed either.
        let under = link.join("uid2");
        assert!(
            prepare_target(&under, &tmp_staging())
                .unwrap_err()
                .rule
                .contains("symlink")
        );
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(
            prepare_target(&file, &tmp_staging())
                .unwrap_err()
                .rule
                .contains("not a directory")
        );
    }

    #[test]
    fn parses_mountinfo_lines_with_escapes() {
        let text = "36 35 98:0 / /mnt/my\\040dir rw,noatime master:1 - fuse.keybroker keybroker rw,user_id=0\n\
                    37 35 0:40 / /run/x rw shared:2 - tmpfs keybroker rw,size=1024k\n";
        let m = parse_mountinfo(text);
        assert_eq!(m[0].mount_point, Path::new("/mnt/my dir"));
        assert_eq!(m[0].fs_type, "fuse.keybroker");
        assert_eq!((m[0].dev.as_str(), m[1].dev.as_str()), ("98:0", "0:40"));
        assert!(is_keybroker_mount(&m[0]));
        assert_eq!(m[1].source, "keybroker");
        assert!(is_keybroker_mount(&m[1]));
    }
}
