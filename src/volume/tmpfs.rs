//! The tmpfs volume: real files on a tmpfs mount (memory, never disk), in the layout kubelet's
//! atomic writer uses for Secret and ConfigMap volumes, so applications that already watch
//! those keep working:
//!
//! ```text
//! DIR/..2026_11_23_14_42_58.123456789/   the files of one snapshot
//! DIR/..data -> ..2026_11_23_14_42_58.123456789
//! DIR/<name> -> ..data/<name>
//! ```
//!
//! A new snapshot is written to a new timestamped directory and published by renaming one
//! symlink (`..data`), so a reader that resolves `..data` once sees a complete snapshot. When
//! nothing changed nothing is written (inotify on `..data` fires only for real changes).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use super::content::RenderedFile;
use super::{Owner, Volume, VolumeError, VolumeKind};

pub const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// What was last written, to detect "nothing changed" without reading files back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Written {
    snapshot_dir: String,
    /// The snapshot before this one, kept until the next rotation so that a reader that
    /// resolved `..data` just before the swap still finds its files.
    previous_dir: Option<String>,
    files: BTreeMap<String, (u32, [u8; 32])>,
}

pub struct TmpfsVolume {
    /// Where readers look: a read-only bind of `dir` (or `dir` itself when not mounted here).
    target: PathBuf,
    /// Where this process writes: the tmpfs itself.
    dir: PathBuf,
    owner: Owner,
    written: Mutex<Option<Written>>,
    mounted: bool,
}

const MOUNT_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

impl TmpfsVolume {
    /// Mounts a tmpfs of at most `size` bytes at `staging` (private to keybroker) and binds it
    /// read-only at `target`, so that nobody, root included, can change a secret file in place.
    pub fn mount(
        target: &Path,
        staging: &Path,
        size: usize,
        owner: Owner,
    ) -> Result<Self, VolumeError> {
        let fail = |path: &Path, e: nix::errno::Errno| VolumeError::Mount {
            kind: VolumeKind::Tmpfs,
            path: path.to_owned(),
            error: if e == nix::errno::Errno::EPERM {
                "permission denied: mounting a tmpfs needs root (CAP_SYS_ADMIN); use type: fuse instead".into()
            } else {
                e.to_string()
            },
        };
        std::fs::create_dir_all(staging).map_err(|e| VolumeError::Mount {
            kind: VolumeKind::Tmpfs,
            path: staging.to_owned(),
            error: e.to_string(),
        })?;
        // `noswap` (Linux ≥ 6.4): the secrets never go to swap. Older kernels refuse the
        // option; the volume is then mounted without it and the node says so, loudly, once.
        let data = format!("size={size},mode=0755,uid={},gid={}", owner.uid, owner.gid);
        let mount = |opts: &str| {
            nix::mount::mount(
                Some("keybroker"),
                staging,
                Some("tmpfs"),
                MOUNT_FLAGS,
                Some(opts),
            )
        };
        match mount(&format!("{data},noswap")) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::error!(
                        "this kernel's tmpfs has no noswap option (Linux < 6.4): tmpfs volumes can be swapped out; disable swap on this node or use volumeType: fuse"
                    )
                });
                mount(&data).map_err(|e| fail(staging, e))?;
            }
            Err(e) => return Err(fail(staging, e)),
        }
        let bind = nix::mount::mount(
            Some(staging),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .and_then(|_| {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MOUNT_FLAGS,
                None::<&str>,
            )
        });
        if let Err(e) = bind {
            let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
            let _ = nix::mount::umount2(staging, MntFlags::MNT_DETACH);
            return Err(fail(target, e));
        }
        let mut v = Self::at(staging, owner, true);
        v.target = target.to_owned();
        Ok(v)
    }

    /// Takes over a volume a previous keybroker process mounted (target bound read-only to
    /// `staging`), learning what is written so that unchanged content is not rewritten.
    pub fn adopt(target: &Path, staging: &Path, owner: Owner) -> Self {
        let mut v = Self::at(staging, owner, true);
        v.target = target.to_owned();
        let written = std::fs::read_link(staging.join(DATA_LINK))
            .ok()
            .and_then(|snap| {
                let snapshot_dir = snap.to_str()?.to_owned();
                let mut files = BTreeMap::new();
                let snap = staging.join(&snapshot_dir);
                // Files, and one level of version directories (`dir/0`, ...).
                let mut stack = vec![(snap, String::new())];
                while let Some((dir, prefix)) = stack.pop() {
                    for e in std::fs::read_dir(&dir).ok()? {
                        let e = e.ok()?;
                        let name = format!("{prefix}{}", e.file_name().to_str()?);
                        let meta = e.metadata().ok()?;
                        if meta.is_dir() {
                            if prefix.is_empty() {
                                stack.push((e.path(), format!("{name}/")));
                            }
                            continue;
                        }
                        let mode = meta.permissions().mode() & 0o777;
                        let bytes = zeroize::Zeroizing::new(std::fs::read(e.path()).ok()?);
                        files.insert(name, (mode, Sha256::digest(&*bytes).into()));
                    }
                }
                Some(Written {
                    snapshot_dir,
                    previous_dir: None,
                    files,
                })
            });
        // A process killed between publishing a snapshot (the `..data` rename) and linking
        // its names left names missing; `apply` of the same files would then find nothing to
        // do. Link them now, and drop what a write cut short left (`..data_tmp`, a snapshot
        // never published).
        if let Some(w) = &written
            && let Err(e) = v.fix_links_and_clean(w)
        {
            tracing::warn!(volume = %staging.display(), error = %e, "cannot complete the links of a volume taken over; its next rotation writes them");
        }
        *v.written.lock().unwrap_or_else(|p| p.into_inner()) = written;
        v
    }

    /// Writes into an existing directory without mounting anything (the directory must be on
    /// a memory filesystem for secrets to stay off disk; the caller decides).
    pub fn at(dir: &Path, owner: Owner, mounted: bool) -> Self {
        Self {
            target: dir.to_owned(),
            dir: dir.to_owned(),
            owner,
            written: Mutex::new(None),
            mounted,
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> VolumeError {
        VolumeError::Write {
            path: self.dir.clone(),
            error: e.to_string(),
        }
    }

    fn write_snapshot(&self, files: &[RenderedFile], want: &Written) -> Result<(), VolumeError> {
        let snap = self.dir.join(&want.snapshot_dir);
        std::fs::create_dir(&snap).map_err(|e| self.err(e))?;
        std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| self.err(e))?;
        std::os::unix::fs::chown(&snap, Some(self.owner.uid), Some(self.owner.gid))
            .map_err(|e| self.err(e))?;
        for f in files {
            let path = snap.join(f.name.as_str());
            if let (Some(sub), _) = f.name.split() {
                let d = snap.join(sub);
                if !d.exists() {
                    std::fs::create_dir(&d).map_err(|e| self.err(e))?;
                    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                        .map_err(|e| self.err(e))?;
                    std::os::unix::fs::chown(&d, Some(self.owner.uid), Some(self.owner.gid))
                        .map_err(|e| self.err(e))?;
                }
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| self.err(format!("{}: {e}", f.name)))?;
            file.write_all(f.bytes.expose())
                .map_err(|e| self.err(format!("{}: {e}", f.name)))?;
            std::os::unix::fs::fchown(&file, Some(self.owner.uid), Some(self.owner.gid))
                .map_err(|e| self.err(format!("{}: {e}", f.name)))?;
            file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(|e| self.err(format!("{}: {e}", f.name)))?;
        }
        // Publish: one rename of the ..data symlink.
        let tmp = self.dir.join(DATA_TMP);
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&want.snapshot_dir, &tmp).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, self.dir.join(DATA_LINK)).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn fix_links_and_clean(&self, want: &Written) -> Result<(), VolumeError> {
        // One link per top-level entry: a file, or a directory of versions (`dir/0`, ...).
        let top: std::collections::BTreeSet<&str> = want
            .files
            .keys()
            .map(|n| n.split_once('/').map_or(n.as_str(), |(d, _)| d))
            .collect();
        for name in &top {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new(DATA_LINK).join(name), &link)
                    .map_err(|e| self.err(e))?;
            }
        }
        for entry in std::fs::read_dir(&self.dir).map_err(|e| self.err(e))? {
            let entry = entry.map_err(|e| self.err(e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == DATA_LINK
                || name == crate::broker::NODE_SOCKET
                || name == want.snapshot_dir
                || Some(&name) == want.previous_dir.as_ref()
            {
                continue;
            }
            if name.starts_with("..") {
                // An older snapshot (or a leftover of a crash mid-write).
                let _ = std::fs::remove_dir_all(entry.path())
                    .or_else(|_| std::fs::remove_file(entry.path()));
            } else if !top.contains(name.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

fn snapshot_dir_name() -> String {
    // kubelet's format: ..2006_01_02_15_04_05.000000000
    let t = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    let t = t.trim_end_matches('Z').replace(['-', ':', 'T'], "_");
    format!("..{t}")
}

impl Volume for TmpfsVolume {
    fn kind(&self) -> VolumeKind {
        VolumeKind::Tmpfs
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let mut guard = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let digests: BTreeMap<String, (u32, [u8; 32])> = files
            .iter()
            .map(|f| {
                (
                    f.name.as_str().to_owned(),
                    (f.mode & 0o777, Sha256::digest(f.bytes.expose()).into()),
                )
            })
            .collect();
        let old = guard.clone().unwrap_or_default();
        if guard.is_some() && old.files == digests {
            return Ok(Vec::new());
        }
        let mut changed: Vec<String> = digests
            .iter()
            .filter(|(n, d)| old.files.get(*n) != Some(*d))
            .map(|(n, _)| n.clone())
            .collect();
        changed.extend(
            old.files
                .keys()
                .filter(|n| !digests.contains_key(*n))
                .cloned(),
        );
        let mut want = Written {
            snapshot_dir: snapshot_dir_name(),
            previous_dir: guard.as_ref().map(|w| w.snapshot_dir.clone()),
            files: digests,
        };
        if want.snapshot_dir == old.snapshot_dir {
            want.snapshot_dir.push('_');
        }
        self.write_snapshot(files, &want)?;
        self.fix_links_and_clean(&want)?;
        *guard = Some(want);
        Ok(changed)
    }

    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        if !self.mounted {
            return Ok(());
        }
        // Lazy: a reader holding a file open must not make shutdown fail; the memory is freed
        // when the last reference goes.
        let res = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH).map_err(|e| {
            VolumeError::Unmount {
                path: self.target.clone(),
                error: e.to_string(),
            }
        });
        if self.dir != self.target {
            let _ = nix::mount::umount2(&self.dir, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&self.dir);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, v: &str, mode: u32) -> RenderedFile {
        RenderedFile::for_test(name, v, mode)
    }

    fn owner() -> Owner {
        Owner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    /// kill -9 between the `..data` rename and the names' links (found by a publish storm
    /// killed under load): the process that takes the volume over serves every name.
    #[test]
    fn a_volume_taken_over_mid_write_gets_its_names_linked() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            file("password", "s3cret", 0o400),
            file("user", "app", 0o440),
        ];
        let v = TmpfsVolume::at(dir.path(), owner(), false);
        v.apply(&files).unwrap();
        // What the killed process left: the snapshot published, no name linked yet, and a
        // temporary link of a write it never finished.
        for n in ["password", "user"] {
            std::fs::remove_file(dir.path().join(n)).unwrap();
        }
        std::os::unix::fs::symlink("..gone", dir.path().join(DATA_TMP)).unwrap();
        let adopted = TmpfsVolume::adopt(dir.path(), dir.path(), owner());
        assert!(
            adopted.apply(&files).unwrap().is_empty(),
            "same content: nothing rewritten"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("password")).unwrap(),
            "s3cret"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("user")).unwrap(),
            "app"
        );
        assert!(std::fs::symlink_metadata(dir.path().join(DATA_TMP)).is_err());
    }

    #[test]
    fn atomic_writer_layout_and_no_rewrite_when_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let v = TmpfsVolume::at(dir.path(), owner(), false);
        assert_eq!(
            v.apply(&[file("a", "one", 0o440), file("b", "two", 0o400)])
                .unwrap(),
            ["a", "b"]
        );
        let data1 = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a")).unwrap(),
            "one"
        );
        let mode = std::fs::metadata(dir.path().join("b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o400);

        assert!(
            v.apply(&[file("a", "one", 0o440), file("b", "two", 0o400)])
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            std::fs::read_link(dir.path().join(DATA_LINK)).unwrap(),
            data1
        );

        assert_eq!(v.apply(&[file("a", "uno", 0o440)]).unwrap(), ["a", "b"]);
        let data2 = std::fs::read_link(dir.path().join(DATA_LINK)).unwrap();
        assert_ne!(data1, data2);
        assert!(
            dir.path().join(&data1).exists(),
            "the previous snapshot stays for one rotation"
        );
        v.apply(&[file("a", "tres", 0o440)]).unwrap();
        assert!(
            !dir.path().join(&data1).exists(),
            "older snapshots are removed"
        );
        assert!(
            std::fs::symlink_metadata(dir.path().join("b")).is_err(),
            "removed name unlinked"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a")).unwrap(),
            "tres"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "..data, two snapshots, one link: {names:?}");
    }
}
