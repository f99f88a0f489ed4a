//! What the broker API (`keybroker.v1.Broker`, edge in `keybroker_csi::broker`) serves: one
//! volume's current files, to the callers the kernel vouches for.
//!
//! Two ways in share this one backend:
//! - `keybroker sidecar --api-socket`: callers admitted by uid ([`Admission::Uids`]);
//! - `keybroker node`, a tmpfs volume with `api: "true"`: the socket is [`NODE_SOCKET`] in the
//!   volume itself, and a caller is admitted only when its cgroup is the volume's pod
//!   ([`Admission::Pod`]), whatever its uid.
//!
//! Every refusal and every `Get` is audited (never the value).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use keybroker_csi::broker::{BrokerBackend, BrokerError, Caller, Value};

use crate::audit::{AuditLog, Event, EventKind, Outcome, PodRef};
use crate::procinfo::ProcCache;
use crate::secret::SecretBytes;
use crate::volume::content::RenderedFile;
use crate::volume::opens::OpenWindows;
use crate::volume::{Volume, VolumeError, VolumeKind};

/// The socket's name inside a node tmpfs volume (`..` names are the atomic writer's own: no
/// file of the volume can take it, and the writer leaves it alone).
pub const NODE_SOCKET: &str = "..keybroker.sock";

/// Who may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// These uids (the sidecar: the application's user).
    Uids(Vec<u32>),
    /// Processes of this pod, by the pod UID in their cgroup path (node volumes).
    Pod(String),
}

pub struct Broker {
    files: RwLock<BTreeMap<String, (SecretBytes, String)>>,
    generation: tokio::sync::watch::Sender<u64>,
    admission: Admission,
    audit: AuditLog,
    volume: String,
    pod: Option<PodRef>,
    /// `Get`s coalesced like opens: (pid, uid, name, version).
    gets: Mutex<OpenWindows<(u32, u32, String, String)>>,
    procs: Mutex<ProcCache>,
    /// With [`Admission::Pod`]: only these programs may call (a binding's `executables`;
    /// empty: any program of the pod).
    executables: Vec<String>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.gets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(&self.audit, true);
    }
}

impl Broker {
    pub fn new(admission: Admission, audit: AuditLog, volume: String, pod: Option<PodRef>) -> Self {
        Self {
            files: Default::default(),
            generation: tokio::sync::watch::channel(0).0,
            admission,
            audit,
            volume,
            pod,
            gets: Default::default(),
            procs: Default::default(),
            executables: Vec::new(),
        }
    }

    /// Only callers running these programs (paths inside the container) are admitted.
    pub fn with_executables(mut self, executables: Vec<String>) -> Self {
        self.executables = executables;
        self
    }

    /// Records the counts of `Get` windows that have closed (about once a second).
    pub fn flush_gets(&self) {
        self.gets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(&self.audit, false);
    }

    /// Makes `files` what the API serves; `changed` wakes the Watch streams.
    pub fn update(&self, files: &[RenderedFile], changed: bool) {
        let next: BTreeMap<String, (SecretBytes, String)> = files
            .iter()
            .map(|f| {
                (
                    f.name.as_str().to_owned(),
                    (f.bytes.clone(), f.version.clone()),
                )
            })
            .collect();
        // The previous values are dropped (zeroized) outside the lock.
        let old = std::mem::replace(
            &mut *self.files.write().unwrap_or_else(|p| p.into_inner()),
            next,
        );
        drop(old);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    fn event(&self, kind: EventKind) -> Event {
        let mut ev = Event::new(kind).volume(self.volume.clone());
        ev.pod = self.pod.clone();
        ev
    }

    /// Why `caller` may not call, or `None`.
    fn refusal(&self, caller: &Caller) -> Option<String> {
        match &self.admission {
            Admission::Uids(uids) => (!uids.contains(&caller.uid)).then(|| {
                format!(
                    "uid {} may not use the broker API (allowed: {uids:?})",
                    caller.uid
                )
            }),
            Admission::Pod(pod_uid) => {
                let Some(pid) = caller.pid.filter(|p| *p > 0) else {
                    return Some("the caller's process is not visible to keybroker".into());
                };
                let cgroup =
                    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                match crate::procinfo::parse_cgroup(&cgroup).0 {
                    Some(p) if &p == pod_uid && self.executables.is_empty() => None,
                    Some(p) if &p == pod_uid => {
                        // Read after the cgroup: the same task (the caller waits for the reply).
                        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                            .ok()
                            .map(|e| e.to_string_lossy().into_owned());
                        match exe {
                            Some(e) if self.executables.contains(&e) => None,
                            Some(_) => Some(format!(
                                "pid {pid}'s program is not one of the executables this volume's binding allows"
                            )),
                            None => Some(format!("pid {pid}'s program could not be read")),
                        }
                    }
                    Some(other) => Some(format!(
                        "pid {pid} belongs to pod {other}{}, not to this volume's pod {pod_uid}",
                        crate::procinfo::pod_name(&other)
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    )),
                    None => Some(format!(
                        "pid {pid} is not in a pod's cgroup; only pod {pod_uid} may use this volume's broker API"
                    )),
                }
            }
        }
    }
}

impl BrokerBackend for Broker {
    fn admit(&self, caller: Caller, rpc: &str) -> Result<(), BrokerError> {
        let Some(why) = self.refusal(&caller) else {
            return Ok(());
        };
        self.audit.record(
            self.event(EventKind::Deny)
                .outcome(Outcome::Denied)
                .detail(format!(
                    "broker {rpc} from pid {} uid {} gid {}",
                    caller.pid.unwrap_or(0),
                    caller.uid,
                    caller.gid
                ))
                .error(&why),
        );
        Err(BrokerError::PermissionDenied(why))
    }

    fn get(&self, caller: Caller, name: &str) -> Result<Value, BrokerError> {
        let map = self.files.read().unwrap_or_else(|p| p.into_inner());
        let (bytes, version) = map
            .get(name)
            .ok_or_else(|| BrokerError::NotFound(format!("no file {name:?} in this volume")))?;
        // Coalesced as opens are (`volume::opens`): a caller in a tight loop costs the audit
        // log one record a second per name and version, each counted.
        let pid = caller.pid.unwrap_or(0).max(0) as u32;
        let mut gets = self.gets.lock().unwrap_or_else(|p| p.into_inner());
        gets.flush(&self.audit, false);
        gets.note(
            &self.audit,
            (pid, caller.uid, name.to_owned(), version.clone()),
            || {
                let process = self
                    .procs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .resolve(pid, caller.uid, caller.gid);
                self.event(EventKind::Read)
                    .file(name.to_owned())
                    .version(version.clone())
                    .process(process)
                    .detail("broker Get")
            },
        );
        drop(gets);
        Ok(Value {
            bytes: zeroize::Zeroizing::new(bytes.expose().to_vec()),
            version: version.clone(),
            expires_at: 0,
        })
    }

    fn list(&self) -> Vec<(String, String)> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, (_, v))| (n.clone(), v.clone()))
            .collect()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// A volume whose every write also becomes what its broker serves.
pub struct Serving {
    inner: Box<dyn Volume>,
    broker: Arc<Broker>,
}

impl Serving {
    pub fn new(inner: Box<dyn Volume>, broker: Arc<Broker>) -> Self {
        Self { inner, broker }
    }
}

impl Volume for Serving {
    fn kind(&self) -> VolumeKind {
        self.inner.kind()
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let changed = self.inner.apply(files)?;
        self.broker.update(files, !changed.is_empty());
        Ok(changed)
    }

    fn tick(&self) {
        self.inner.tick();
        self.broker.flush_gets();
    }

    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        self.inner.unmount()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(a: Admission, dir: &tempfile::TempDir) -> Broker {
        let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
        Broker::new(a, audit, "v".into(), None)
    }

    #[test]
    fn uid_admission() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(Admission::Uids(vec![1000]), &dir);
        let c = |uid| Caller {
            pid: Some(1),
            uid,
            gid: 0,
        };
        assert!(b.admit(c(1000), "Get").is_ok());
        let e = b.admit(c(0), "Get").unwrap_err();
        assert!(matches!(e, BrokerError::PermissionDenied(m) if m.contains("uid 0")));
    }

    #[test]
    fn pod_admission_refuses_processes_outside_the_pod() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(
            Admission::Pod("0f0e0d0c-0b0a-0908-0706-050403020100".into()),
            &dir,
        );
        // This test process is not in that pod's cgroup.
        let me = Caller {
            pid: Some(std::process::id() as i32),
            uid: 0,
            gid: 0,
        };
        assert!(b.admit(me, "Get").is_err());
        let unknown = Caller {
            pid: None,
            uid: 0,
            gid: 0,
        };
        assert!(b.admit(unknown, "List").is_err());
        b.audit.flush();
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(audit.matches("\"deny\"").count(), 2, "{audit}");
    }

    #[test]
    fn gets_in_a_loop_are_coalesced_and_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(Admission::Uids(vec![0]), &dir);
        b.update(&[RenderedFile::for_test("db", "s3cret", 0o400)], true);
        let me = Caller {
            pid: Some(std::process::id() as i32),
            uid: 0,
            gid: 0,
        };
        for _ in 0..500 {
            assert_eq!(&*b.get(me, "db").unwrap().bytes, b"s3cret");
        }
        b.gets.lock().unwrap().flush(&b.audit, true);
        b.audit.flush();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|r: &serde_json::Value| r["event"] == "read")
            .collect();
        assert_eq!(
            recs.len(),
            2,
            "first Get at once, the rest in one counted record"
        );
        let total: u64 = recs.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum();
        assert_eq!(total, 500);
        assert_eq!(recs[0]["process"]["pid"], std::process::id());
    }
}
