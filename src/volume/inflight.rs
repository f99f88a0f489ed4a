//! Whose open each permission event being decided is, written down where the next process can
//! read it (issue #25, "No window"). A fanotify event that the listener has read and not yet
//! answered is known to the kernel only by the descriptor number the listener got for it. If
//! the process dies then, the group lives on at the fd keeper and the opener waits; the next
//! process can answer the event by that number, but not know whose open it is. Without this
//! journal it must refuse such opens where a binding refuses readers (the pod's own reader
//! would see EPERM after a crash).
//!
//! The journal is a file in the node's state directory (memory-backed `/run`), one 16-byte slot
//! per descriptor number: the opener's pid and the device of the opened file (which volume it
//! is). A slot is written as soon as the event is read and cleared just before its answer, so a
//! slot always describes an event that was read and not answered. No secret, no path. Each
//! process writes its own file and holds a lock on it while it lives: a file nobody holds the
//! lock on is a dead process's.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SLOT: u64 = 16;
const MAGIC: u32 = 0x4b42_4f50;
/// Descriptor numbers past this are not journaled (their events are refused after a crash).
pub const MAX_FD: i32 = 1 << 20;
const PREFIX: &str = "fanotify-inflight-";

/// An event a dead process read and did not answer: its opener and the file's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unanswered {
    pub pid: i32,
    pub dev: u64,
}

/// This process's journal (locked while it lives, removed when dropped).
pub struct Inflight {
    file: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl Inflight {
    /// A new journal in `dir` for this process.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = dir.join(format!("{PREFIX}{}-{nanos}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        Ok(Self { file, path })
    }

    /// The event with descriptor `fd`, of `pid`'s open of a file on `dev`, was read.
    pub fn note(&self, fd: i32, pid: i32, dev: u64) {
        if !(0..MAX_FD).contains(&fd) {
            return;
        }
        let mut slot = [0u8; SLOT as usize];
        slot[..4].copy_from_slice(&pid.to_le_bytes());
        slot[4..8].copy_from_slice(&MAGIC.to_le_bytes());
        slot[8..].copy_from_slice(&dev.to_le_bytes());
        if let Err(e) = self.file.write_all_at(&slot, fd as u64 * SLOT) {
            tracing::warn!(error = %e, "cannot note an open being decided (a crash now would refuse it)");
        }
    }

    /// The event with descriptor `fd` is about to be answered.
    pub fn clear(&self, fd: i32) {
        if (0..MAX_FD).contains(&fd) {
            let _ = self
                .file
                .write_all_at(&[0u8; SLOT as usize], fd as u64 * SLOT);
        }
    }

    /// The journals of dead processes in `dir` (those no live process locks), oldest first,
    /// each with the events it names: this process takes them over (locks them, clears each
    /// slot as it answers its event, and removes a journal when dropping it). Several: a
    /// process that died before it had answered what an earlier dead one left.
    pub fn orphaned(dir: &Path) -> Vec<(Inflight, HashMap<i32, Unanswered>)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut found: Vec<(u128, Inflight, HashMap<i32, Unanswered>)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let made: u128 = rest
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let path = e.path();
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            let Ok(file) =
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            else {
                // A live process's (the other side of a handover).
                continue;
            };
            let events = slots(&file);
            found.push((made, Inflight { file, path }, events));
        }
        found.sort_by_key(|(made, _, _)| *made);
        found.into_iter().map(|(_, j, e)| (j, e)).collect()
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The filled slots of a journal (a file of at most `MAX_FD` slots; holes read as zeros).
fn slots(file: &File) -> HashMap<i32, Unanswered> {
    let len = file
        .metadata()
        .map_or(0, |m| m.len())
        .min(MAX_FD as u64 * SLOT);
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    while off < len {
        let want = ((len - off) as usize).min(buf.len());
        let Ok(n) = file.read_at(&mut buf[..want], off) else {
            break;
        };
        if n == 0 {
            break;
        }
        for (i, s) in buf[..n - n % SLOT as usize]
            .chunks_exact(SLOT as usize)
            .enumerate()
        {
            let magic = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
            let pid = i32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if magic == MAGIC && pid > 0 {
                let fd = (off / SLOT) as i32 + i as i32;
                let dev = u64::from_le_bytes(s[8..16].try_into().unwrap_or_default());
                out.insert(fd, Unanswered { pid, dev });
            }
        }
        off += (n - n % SLOT as usize) as u64;
        if n % SLOT as usize != 0 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_processs_unanswered_events_are_found_and_a_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let live = Inflight::create(dir.path()).unwrap();
        live.note(5, 100, 7);
        live.note(9, 101, 7);
        live.clear(9);
        live.note(-1, 103, 7);
        live.note(MAX_FD, 104, 7);
        // Two dead processes' journals (nobody holds their locks), the older one named first.
        let older = dir.path().join(format!("{PREFIX}1-100"));
        let newer = dir.path().join(format!("{PREFIX}2-200"));
        std::fs::copy(&live.path, &newer).unwrap();
        std::fs::write(&older, []).unwrap();
        let found = Inflight::orphaned(dir.path());
        assert_eq!(found.len(), 2, "a live process's journal is left alone");
        assert_eq!(found[0].0.path, older);
        assert!(found[0].1.is_empty());
        assert_eq!(
            found[1].1,
            HashMap::from([(5, Unanswered { pid: 100, dev: 7 })])
        );
        // Taken over: locked by this process until dropped, then removed.
        assert!(Inflight::orphaned(dir.path()).is_empty());
        found[1].0.clear(5);
        assert!(slots(&found[1].0.file).is_empty());
        drop(found);
        assert!(!older.exists() && !newer.exists());
        let path = live.path.clone();
        drop(live);
        assert!(!path.exists(), "a journal goes with its process");
    }

    #[test]
    fn slots_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Inflight::create(dir.path()).unwrap();
        j.note(5, 100, 7);
        j.note(9, 101, 7);
        j.note(40_000, 102, 8);
        j.clear(9);
        let got = slots(&j.file);
        assert_eq!(got.len(), 2);
        assert_eq!(got[&5], Unanswered { pid: 100, dev: 7 });
        assert_eq!(got[&40_000], Unanswered { pid: 102, dev: 8 });
    }
}
