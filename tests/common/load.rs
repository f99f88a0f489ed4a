//! Conditions a node is in when things go wrong: every core busy, processes in a pod's cgroup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One busy loop per core plus one, as separate processes (a CPU burner), for the life of the
/// value: whatever a test does meanwhile competes for every core.
pub struct CpuBurner(Vec<Child>);

impl CpuBurner {
    pub fn start() -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
        Self(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("sh")
                })
                .collect(),
        )
    }
}

impl Drop for CpuBurner {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A cgroup standing for a pod's (the v1 pids hierarchy, kubelet's cgroupfs layout:
/// `kubepods-keybroker-test/pod<uid>`), and optionally a container's inside it; every
/// directory made is removed on drop (once its processes are gone). Tests running at once
/// share the parent: whoever drops last removes it.
pub struct PodCgroup {
    pub pod: PathBuf,
    made: Vec<PathBuf>,
}

const CGROUP_BASE: &str = "/sys/fs/cgroup/pids/kubepods-keybroker-test";

impl PodCgroup {
    pub fn new(pod_uid: &str) -> Self {
        let base = Path::new(CGROUP_BASE);
        let pod = base.join(format!("pod{pod_uid}"));
        // Another test may make the parent at the same moment.
        match std::fs::create_dir(base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("a cgroup v1 pids hierarchy at /sys/fs/cgroup/pids: {e}"),
        }
        let mut made = Vec::new();
        if !pod.exists() {
            std::fs::create_dir(&pod).expect("the pod's cgroup");
            made.push(pod.clone());
        }
        Self { pod, made }
    }

    /// A container's cgroup in the pod (its id: 64 hex digits, as containerd's).
    pub fn container(&mut self, id: &str) -> PathBuf {
        assert!(id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()));
        let c = self.pod.join(id);
        std::fs::create_dir_all(&c).unwrap();
        self.made.push(c.clone());
        c
    }

    /// `sh -c` prefix that moves the shell into `cgroup` before the rest runs.
    pub fn enter(cgroup: &Path) -> String {
        format!("echo $$ > {}/cgroup.procs && ", cgroup.display())
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Innermost first; a cgroup is removable once its last process has exited.
        for d in self.made.iter().rev() {
            for _ in 0..250 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Fails while another test's pod is still in it: that test removes it.
        let _ = std::fs::remove_dir(CGROUP_BASE);
    }
}
