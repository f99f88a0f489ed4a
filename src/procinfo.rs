//! Who is calling: a FUSE request carries the calling *thread's* id, uid and gid. This module
//! turns the thread id into the process (thread group) id, its command name and, when the
//! process runs in a Kubernetes pod, the pod UID and container id from its cgroup path.
//!
//! Lookups are cached per thread id for two seconds, so a process that opens many files costs
//! one set of /proc reads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Process id (thread group id); the thread id when the process is already gone.
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    /// Command name (`/proc/<pid>/comm`), `None` when the process exited before the lookup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Parses the `Tgid:` line of /proc/<tid>/status.
pub fn parse_tgid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Extracts the pod UID and container id from a cgroup path (cgroupfs and systemd drivers):
/// `.../kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope` or
/// `/kubepods/burstable/pod<uid>/<id>`.
pub fn parse_cgroup(cgroup: &str) -> (Option<String>, Option<String>) {
    let path = cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|p| p.contains("kubepods"))
        .unwrap_or("");
    let mut pod = None;
    let mut container = None;
    for seg in path.split('/') {
        let seg = seg.trim_end_matches(".slice").trim_end_matches(".scope");
        if let Some(i) = seg.rfind("pod") {
            let cand = &seg[i + 3..];
            if cand.len() == 36
                && cand
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
            {
                pod = Some(cand.replace('_', "-"));
                continue;
            }
        }
        if pod.is_some() {
            let id = seg.rsplit('-').next().unwrap_or(seg);
            if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                container = Some(id.to_owned());
            }
        }
    }
    (pod, container)
}

/// Resident memory of a process (VmRSS), in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A small cache of thread → process lookups; processes that open many files cost one lookup.
#[derive(Default)]
pub struct ProcCache {
    entries: HashMap<u32, (Instant, ProcessRef)>,
}

const TTL: Duration = Duration::from_secs(2);
const MAX_ENTRIES: usize = 4096;

impl ProcCache {
    pub fn resolve(&mut self, tid: u32, uid: u32, gid: u32) -> ProcessRef {
        let now = Instant::now();
        if let Some((at, p)) = self.entries.get(&tid)
            && now.duration_since(*at) < TTL
            && p.uid == uid
            && p.gid == gid
        {
            return p.clone();
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        let p = lookup(tid, uid, gid);
        self.entries.insert(tid, (now, p.clone()));
        p
    }
}

impl ProcCache {
    /// A process known by its pid alone (fanotify): uid and gid (effective) from its status.
    /// The flag says whether /proc was read now (false: from the cache).
    pub fn resolve_pid(&mut self, pid: u32) -> (ProcessRef, bool) {
        let now = Instant::now();
        if let Some((at, p)) = self.entries.get(&pid)
            && now.duration_since(*at) < TTL
        {
            return (p.clone(), false);
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let id = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX)
        };
        let p = lookup(pid, id("Uid:"), id("Gid:"));
        self.entries.insert(pid, (now, p.clone()));
        (p, true)
    }
}

impl ProcCache {
    pub fn forget(&mut self, pid: u32) {
        self.entries.remove(&pid);
    }
}

fn lookup(tid: u32, uid: u32, gid: u32) -> ProcessRef {
    let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| parse_tgid(&s));
    let pid = tgid.unwrap_or(tid);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned());
    let (pod_uid, container) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| parse_cgroup(&c))
        .unwrap_or((None, None));
    ProcessRef {
        pid,
        tid: (tid != pid).then_some(tid),
        uid,
        gid,
        comm,
        pod_uid,
        container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tgid_is_read_from_status() {
        assert_eq!(
            parse_tgid("Name:\tcat\nUmask:\t0022\nState:\tR\nTgid:\t4242\nPid:\t4243\n"),
            Some(4242)
        );
        assert_eq!(parse_tgid("Name: x\n"), None);
    }

    #[test]
    fn pod_and_container_from_systemd_and_cgroupfs_paths() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_7988_a1b2_c3d4e5f60718.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";
        let (pod, c) = parse_cgroup(systemd);
        assert_eq!(pod.as_deref(), Some("1f2e3d4c-5b6a-7988-a1b2-c3d4e5f60718"));
        assert_eq!(
            c.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        let cgroupfs = "0::/kubepods/besteffort/pod1f2e3d4c-5b6a-7988-a1b2-c3d4e5f60718/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n";
        let (pod, c) = parse_cgroup(cgroupfs);
        assert_eq!(pod.as_deref(), Some("1f2e3d4c-5b6a-7988-a1b2-c3d4e5f60718"));
        assert!(c.is_some());
        assert_eq!(
            parse_cgroup("0::/user.slice/session-1.scope\n"),
            (None, None)
        );
    }

    #[test]
    fn resident_memory_of_this_process_is_plausible() {
        let rss = resident_bytes(std::process::id()).unwrap();
        assert!(rss > 1 << 20 && rss < 4 << 30, "{rss}");
    }

    #[test]
    fn resolves_this_process() {
        let me = std::process::id();
        let p = ProcCache::default().resolve(me, 0, 0);
        assert_eq!(p.pid, me);
        assert!(p.comm.is_some());
    }
}
