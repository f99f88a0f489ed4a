//! Rotation notices for node volumes: `onChange` signals reach the volume's own pod only (its
//! processes found by name through the node's PID view and checked by their cgroup).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::*;
use common::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cgroup (v1 pids hierarchy, cgroupfs driver layout) standing for the pod's; removed on drop.
struct PodCgroup(std::path::PathBuf);

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(self.0.parent().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_change_signals_the_pods_own_process_only() {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    std::fs::write(root.join("secrets/db"), "S3cret-notify-v1").unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/bindings.yaml"),
        format!(
            "bindings:\n  - name: apps\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {{local: {{path: {}}}}}\n    objects: [db]\n",
            root.join("secrets").display()
        ),
    )
    .unwrap();
    let pod = Pod::new("team-a", "api", 77);
    let cg = PodCgroup(
        std::path::Path::new("/sys/fs/cgroup/pids/kubepods-keybroker-test")
            .join(format!("pod{}", pod.uid)),
    );
    std::fs::create_dir_all(&cg.0).expect("a cgroup v1 pids hierarchy at /sys/fs/cgroup/pids");
    // Two processes named "hupwatch": one in the pod's cgroup, one elsewhere on the node.
    assert!(
        Command::new("cp")
            .arg("/bin/bash")
            .arg(root.join("hupwatch"))
            .status()
            .unwrap()
            .success()
    );
    let spawn = |log: &str| {
        Proc(
            Command::new(root.join("hupwatch"))
                .arg("-c")
                .arg(format!(
                    "trap 'echo hup >> {}' USR1; touch {}; while true; do sleep 0.05; done",
                    root.join(log).display(),
                    root.join(format!("{log}-ready")).display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let inside = spawn("inside");
    let _outside = spawn("outside");
    // Before their traps are set, the signal would end them (USR1, not HUP: a run under
    // nohup ignores SIGHUP, and bash cannot trap a signal ignored at entry): wait until both say they are ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(root.join("inside-ready").exists() && root.join("outside-ready").exists()) {
        assert!(
            Instant::now() < deadline,
            "the test processes did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(cg.0.join("cgroup.procs"), inside.0.id().to_string()).unwrap();

    let d = Daemon::start_with(&root, "1s");
    let mut node = client(&d).await;
    let req = pod.request_with(
        &root,
        &[
            ("provider", "local"),
            ("volumeType", "tmpfs"),
            ("objects", "- objectName: password\n  object: db\n"),
            ("onChange", "- signal: {process: hupwatch, signal: USR1}\n"),
        ],
        None,
    );
    node.node_publish_volume(req)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    std::fs::write(root.join("secrets/db"), "S3cret-notify-v2").unwrap();
    let count = |f: &str| {
        std::fs::read_to_string(root.join(f))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("inside") < 1 {
        assert!(
            Instant::now() < deadline,
            "no signal to the pod's process\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count("inside"), 1, "one rotation, one signal");
    assert_eq!(
        count("outside"),
        0,
        "a process of the same name outside the pod is left alone"
    );
    let audit = std::fs::read_to_string(root.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains(&format!("onChange signal {} to hupwatch", libc::SIGUSR1)),
        "the notice is audited"
    );
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    drop(inside);
    // A bad onChange is refused, naming the field.
    let bad = Pod::new("team-a", "api", 78);
    let e = node
        .node_publish_volume(bad.request_with(
            &root,
            &[
                ("provider", "local"),
                ("objects", "- objectName: password\n  object: db\n"),
                ("onChange", "- signal: {process: hupwatch, signal: KILL}\n"),
            ],
            None,
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("onChange[0].signal.signal"),
        "{}",
        e.message()
    );
}
