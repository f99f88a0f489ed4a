//! Who is calling: a FUSE request carries the calling *thread's* id, uid and gid. This module
//! turns the thread id into the process (thread group) id, its command name and, when the
//! process runs in a Kubernetes pod, the pod UID and container id from its cgroup path.
//!
//! Every lookup records the executable (`/proc/<pid>/exe`, the path as the process's own mount
//! namespace names it) and the cgroup too. Lookups are cached per thread id for two seconds,
//! and a cached entry is used only while the id still belongs to the same task running the
//! same program (its `/proc/<id>/comm`, held open, still reads the same): a pid reused by
//! another process, or a process that has run another program since, is looked up anew. A
//! process that opens many files costs one `pread` per open after its first.

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
    /// The executable (`/proc/<pid>/exe`), as a path inside the process's mount namespace
    /// (a container's own path); `None` when it cannot be read (a kernel thread, a process
    /// that is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The pod's `namespace/name`, where a record needs it (a refused opener) and kubelet's
    /// pod log directories name it ([`pod_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The process's cgroup (the unified hierarchy's path, or the one naming `kubepods`):
    /// "who" for a reader that is not in a pod (a node shell, a system service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// The cgroup path an auditor wants from `/proc/<pid>/cgroup`: the line naming `kubepods`
/// (a pod's container, also on a hybrid v1 host), else the unified hierarchy's (`0::`), else
/// the first.
pub fn cgroup_path(cgroup: &str) -> Option<String> {
    let paths: Vec<(&str, &str)> = cgroup
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?;
            it.next()?;
            Some((id, it.next()?))
        })
        .collect();
    paths
        .iter()
        .find(|(_, p)| p.contains("kubepods"))
        .or_else(|| paths.iter().find(|(id, _)| *id == "0"))
        .or_else(|| paths.first())
        .map(|(_, p)| (*p).to_owned())
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
    entries: HashMap<u32, Entry>,
}

struct Entry {
    at: Instant,
    proof: Proof,
    process: ProcessRef,
}

/// What shows that a cached id still names the task it was looked up for, running the same
/// program: the task's `/proc/<id>/comm`, opened at the lookup and read again (one `pread`)
/// at each use. An open /proc file stays bound to its task: once the task has exited (and
/// only then can its id be reused) reading it fails, and after an `exec` it reads the new
/// program's name.
struct Proof {
    comm: std::fs::File,
    seen: Vec<u8>,
}

impl Proof {
    /// Taken before the lookup, checked again after it: a task that ended meanwhile (its id
    /// possibly reused) fails the check and what was read is not kept.
    fn take(id: u32) -> Option<Self> {
        let comm = std::fs::File::open(format!("/proc/{id}/comm")).ok()?;
        let seen = read_at_start(&comm)?;
        Some(Self { comm, seen })
    }

    fn holds(&self) -> bool {
        read_at_start(&self.comm).is_some_and(|now| now == self.seen)
    }
}

/// A `comm` file's content (at most 64 bytes: the kernel's names are 16).
fn read_at_start(f: &std::fs::File) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 64];
    let n = f.read_at(&mut buf, 0).ok()?;
    (n > 0).then(|| buf[..n].to_vec())
}

const TTL: Duration = Duration::from_secs(2);
/// Entries (each holds an open /proc file) per cache: one per recently active reader of a volume.
const MAX_ENTRIES: usize = 256;

impl ProcCache {
    pub fn resolve(&mut self, tid: u32, uid: u32, gid: u32) -> ProcessRef {
        if let Some(p) = self.cached(tid)
            && p.uid == uid
            && p.gid == gid
        {
            return p;
        }
        let proof = Proof::take(tid);
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
        let p = lookup(tid, &status, uid, gid);
        self.keep(tid, proof, &p);
        p
    }

    /// A process known by its pid alone (fanotify): uid and gid (effective) from its status.
    /// The flag says whether /proc was read now (false: from the cache).
    pub fn resolve_pid(&mut self, pid: u32) -> (ProcessRef, bool) {
        if let Some(p) = self.cached(pid) {
            return (p, false);
        }
        let proof = Proof::take(pid);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let id = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX)
        };
        let p = lookup(pid, &status, id("Uid:"), id("Gid:"));
        self.keep(pid, proof, &p);
        (p, true)
    }

    /// The entry of `id` if it is recent, `id` still names the task it was made for (a task
    /// that is gone is never served from the cache) and the task has not run another program
    /// since (`exec` keeps the pid and changes the command).
    fn cached(&self, id: u32) -> Option<ProcessRef> {
        let e = self.entries.get(&id)?;
        (e.at.elapsed() < TTL && e.proof.holds()).then(|| e.process.clone())
    }

    fn keep(&mut self, id: u32, proof: Option<Proof>, p: &ProcessRef) {
        // Only a lookup that found a task that was still there afterwards is worth keeping.
        let Some(proof) = proof.filter(|pr| p.comm.is_some() && pr.holds()) else {
            self.entries.remove(&id);
            return;
        };
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, e| e.at.elapsed() < TTL);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(
            id,
            Entry {
                at: Instant::now(),
                proof,
                process: p.clone(),
            },
        );
    }

    pub fn forget(&mut self, pid: u32) {
        self.entries.remove(&pid);
    }
}

/// Everything about task `tid` (its `status` already read) and its process.
fn lookup(tid: u32, status: &str, uid: u32, gid: u32) -> ProcessRef {
    let pid = parse_tgid(status).unwrap_or(tid);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (pod_uid, container) = parse_cgroup(&cgroups);
    ProcessRef {
        pid,
        tid: (tid != pid).then_some(tid),
        uid,
        gid,
        comm,
        exe,
        pod_uid,
        container,
        pod: None,
        cgroup: cgroup_path(&cgroups),
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
    fn the_cgroup_an_auditor_wants() {
        let hybrid =
            "12:memory:/kubepods/burstable/podX/abc\n0::/system.slice/containerd.service\n";
        assert_eq!(
            cgroup_path(hybrid).as_deref(),
            Some("/kubepods/burstable/podX/abc")
        );
        assert_eq!(
            cgroup_path("0::/user.slice/session-3.scope\n").as_deref(),
            Some("/user.slice/session-3.scope")
        );
        assert_eq!(cgroup_path(""), None);
    }

    #[test]
    fn a_reused_pid_is_looked_up_anew() {
        let mut c = ProcCache::default();
        let me = std::process::id();
        let (p, fresh) = c.resolve_pid(me);
        assert!(fresh && p.exe.is_some() && p.cgroup.is_some(), "{p:?}");
        assert!(!c.resolve_pid(me).1, "cached while the process is the same");
        // The entry's proof saw another name (as after an exec): looked up anew.
        c.entries.get_mut(&me).unwrap().proof.seen = b"before-exec\n".to_vec();
        assert!(c.resolve_pid(me).1);
        // A task that has exited (its pidfd readable): never served from the cache.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = child.id();
        let (p, _) = c.resolve_pid(id);
        child.wait().unwrap();
        if let Some(e) = c.entries.get(&id) {
            assert!(!e.proof.holds(), "{p:?}");
        }
        assert!(c.cached(id).is_none());
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

/// Where kubelet keeps pods' logs: one directory per pod, `<namespace>_<name>_<uid>`, made by
/// kubelet (a pod cannot name it). Set by the node (`--pod-log-dir`); unset, pods stay
/// unnamed.
static POD_LOG_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
/// Names found, by pod uid (pods outlive many lookups; a full map is cleared).
static POD_NAMES: std::sync::Mutex<Option<HashMap<String, String>>> = std::sync::Mutex::new(None);
const MAX_POD_NAMES: usize = 4096;
/// Entries of the log directory looked at per lookup, at most (a node runs at most a few
/// hundred pods).
const MAX_POD_LOG_ENTRIES: usize = 20_000;

/// Names pods from kubelet's pod log directory `dir` (normally `/var/log/pods`).
pub fn set_pod_log_dir(dir: std::path::PathBuf) {
    let _ = POD_LOG_DIR.set(dir);
}

/// The `namespace/name` of the pod with `uid`, from kubelet's pod log directories.
pub fn pod_name(uid: &str) -> Option<String> {
    let dir = POD_LOG_DIR.get()?;
    let mut names = POD_NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(HashMap::new);
    if let Some(n) = names.get(uid) {
        return Some(n.clone());
    }
    let found = std::fs::read_dir(dir)
        .ok()?
        .take(MAX_POD_LOG_ENTRIES)
        .flatten()
        .find_map(|e| parse_pod_log_dir(&e.file_name().to_string_lossy(), uid))?;
    if names.len() >= MAX_POD_NAMES {
        names.clear();
    }
    names.insert(uid.to_owned(), found.clone());
    Some(found)
}

/// `namespace/name` from a pod log directory's name if it is `uid`'s. Namespaces and pod
/// names are DNS names: no `_`, so the name splits unambiguously.
fn parse_pod_log_dir(entry: &str, uid: &str) -> Option<String> {
    let mut parts = entry.rsplitn(3, '_');
    let (u, name, ns) = (parts.next()?, parts.next()?, parts.next()?);
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (u == uid && dns(name) && dns(ns)).then(|| format!("{ns}/{name}"))
}

impl ProcessRef {
    /// With its pod's name, when it runs in a pod kubelet's log directories name.
    pub fn named(mut self) -> Self {
        if self.pod.is_none()
            && let Some(uid) = &self.pod_uid
        {
            self.pod = pod_name(uid);
        }
        self
    }
}

#[cfg(test)]
mod pod_name_tests {
    use super::parse_pod_log_dir;

    #[test]
    fn pod_log_directories_name_their_pod() {
        let uid = "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc";
        assert_eq!(
            parse_pod_log_dir(&format!("kube-system_debug-node.x_{uid}"), uid).as_deref(),
            Some("kube-system/debug-node.x")
        );
        assert_eq!(
            parse_pod_log_dir(&format!("team-a_api_{uid}"), "other"),
            None
        );
        // Not a name kubelet makes: refused rather than guessed.
        assert_eq!(parse_pod_log_dir(&format!("team_a_api_{uid}"), uid), None);
        assert_eq!(parse_pod_log_dir(&format!("Team-A_api_{uid}"), uid), None);
        assert_eq!(parse_pod_log_dir(&format!("_api_{uid}"), uid), None);
        assert_eq!(parse_pod_log_dir(uid, uid), None);
    }
}
