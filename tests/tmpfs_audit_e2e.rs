//! Every open of a tmpfs volume audited through fanotify: opens by processes in other mount
//! namespaces (each reading the volume through its own bind mount, as a container does) are
//! recorded with their process (command and executable too, also for readers that exit at once
//! while every core is busy), coalesced per process; a queue overflow (notification mode) is a
//! gap record; with `--audit-fail-closed` opens wait for their record and are refused (EPERM)
//! while the log cannot be written.
//!
//! The tests here run one at a time (`SERIAL`): one of them lowers the kernel's
//! `fs.fanotify.max_queued_events`, which every fanotify group created meanwhile would take.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::load::CpuBurner;
use common::node::*;
use common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "S3cret-fanotify-31337";

fn setup() -> (tempfile::TempDir, PathBuf) {
    local_setup(&format!(r#"{{"password":"{SECRET}"}}"#), "[db]")
}

const OBJECTS: &str = "- objectName: password\n  object: db\n  key: password\n";

/// Publishes `pod`'s volume of [`OBJECTS`] with the node's default volume type.
async fn publish(
    node: &mut keybroker_csi::pb::node_client::NodeClient<tonic::transport::Channel>,
    d: &Daemon,
    pod: &Pod,
    root: &Path,
) {
    node.node_publish_volume(pod.request_with(
        root,
        &[("provider", "local"), ("objects", OBJECTS)],
        None,
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
}

/// Runs `script` (bash) as a program named `name`, in a new mount namespace where the volume at
/// `target` is bind-mounted at `view` (a container's view of it). Returns its pid and output.
fn in_container(root: &Path, name: &str, target: &Path, script: &str) -> (u32, String) {
    let exe = root.join(name);
    if !exe.exists() {
        assert!(
            Command::new("cp")
                .arg("/bin/bash")
                .arg(&exe)
                .status()
                .unwrap()
                .success()
        );
    }
    let view = root.join(format!("view-{name}"));
    std::fs::create_dir_all(&view).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .arg("-c")
        .arg(format!(
            "mount --bind {} {} || exit 9; echo pid=$$; V={}; {script}",
            target.display(),
            view.display(),
            view.display()
        ))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name}: {text}");
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name}: {text}"));
    (pid, text)
}

/// Opens recorded for `pid` (a record with `count` stands for that many).
fn opens_of(
    records: &[serde_json::Value],
    volume: &str,
    pid: u32,
) -> (u64, Vec<serde_json::Value>) {
    let mine: Vec<serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "read" && r["volume"] == volume && r["process"]["pid"] == pid)
        .cloned()
        .collect();
    let n = mine.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum();
    (n, mine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_from_other_mount_namespaces_are_all_recorded_with_their_process() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = setup();
    let audit = root.join("audit.jsonl");
    let d = Daemon::start_opts(&root, "1h", &audit, &[]);
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 41);
    // No volumeType: tmpfs is the node's default.
    publish(&mut node, &d, &pod, &root).await;
    let target = pod.target(&root);
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mi
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
        .expect("the target is a mount");
    assert!(line.contains(" - tmpfs keybroker "), "{line}");
    let staging = mi
        .lines()
        .find(|l| {
            l.contains(" - tmpfs keybroker ")
                && l.contains(&format!("{}/state/staging/", root.display()))
        })
        .expect("the staging mount");
    assert!(staging.contains("noswap"), "mounted noswap: {staging}");

    // Three "containers": 20, 35 and 50 opens, each by one process (bash's `read <`) that
    // exits at once, and one open each by 5 short-lived processes (cat) through another mount
    // namespace, all while every core is busy: the node's default (identify) holds each open
    // until its process is read from /proc, so none of them is a pid alone.
    let burner = CpuBurner::start();
    let counts = [("opener-a", 20u64), ("opener-b", 35), ("opener-c", 50)];
    let pids: Vec<u32> = counts
        .iter()
        .map(|(name, n)| {
            let (pid, out) = in_container(
                &root,
                name,
                &target,
                &format!(
                    "for i in $(seq {n}); do x=; read -r x < $V/password; [ -n \"$x\" ] || exit 3; done; echo \"got=$x\""
                ),
            );
            assert!(out.contains(&format!("got={SECRET}")), "{out}");
            pid
        })
        .collect();
    let (_, out) = in_container(
        &root,
        "opener-d",
        &target,
        "for i in 1 2 3 4 5; do cat $V/password > /dev/null & echo cat=$!; wait $! || exit 4; done",
    );
    drop(burner);
    let cat_pids: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("cat="))
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert_eq!(cat_pids.len(), 5, "{out}");
    // Records are written after the opens were allowed: every open, counted exactly
    // (permission events are never merged).
    let vid = format!("csi-{}", pod.uid);
    wait_for("every open recorded", Duration::from_secs(120), || {
        let records = audit_records(&audit);
        counts
            .iter()
            .zip(&pids)
            .all(|((_, n), p)| opens_of(&records, &vid, *p).0 == *n)
            && cat_pids.iter().all(|p| opens_of(&records, &vid, *p).0 == 1)
    });
    let records = audit_records(&audit);
    for ((name, n), pid) in counts.iter().zip(&pids) {
        let (seen, mine) = opens_of(&records, &vid, *pid);
        // One record when the window opened, one with the count of the repeats.
        assert!(
            seen == *n && (1..=2).contains(&mine.len()),
            "{name}: {seen} opens in {mine:?}"
        );
        assert!(
            mine[0]["count"].is_null(),
            "the first record is written at once"
        );
        for r in &mine {
            assert_eq!(r["process"]["comm"], *name);
            assert_eq!(
                r["process"]["exe"].as_str(),
                Some(root.join(name).to_str().unwrap()),
                "the executable as the process's mount namespace names it"
            );
            assert_eq!(r["file"], "password");
            assert_eq!(r["object"], "db");
            assert!(r["version"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
            assert_eq!(r["process"]["uid"], 0);
        }
    }
    for pid in &cat_pids {
        let (_, mine) = opens_of(&records, &vid, *pid);
        assert_eq!(mine[0]["process"]["comm"], "cat", "{mine:?}");
        assert!(
            mine[0]["process"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/cat")),
            "{mine:?}"
        );
    }
    assert!(
        !std::fs::read_to_string(&audit).unwrap().contains(SECRET),
        "never the value"
    );
    // A rotation: opens after it name the new version.
    let before = opens_of(&records, &vid, pids[0]).1[0]["version"].clone();
    std::fs::write(
        root.join("secrets/db"),
        r#"{"password":"S3cret-fanotify-v2"}"#,
    )
    .unwrap();
    wait_for("the rotation", Duration::from_secs(120), || {
        read_file(&target.join("password")).is_ok_and(|v| v == "S3cret-fanotify-v2")
    });
    let (pid, _) = in_container(
        &root,
        "opener-e",
        &target,
        "read -r x < $V/password; [ -n \"$x\" ]",
    );
    wait_for("the new version's record", Duration::from_secs(120), || {
        opens_of(&audit_records(&audit), &vid, pid)
            .1
            .first()
            .is_some_and(|r| {
                r["version"] != before && r["version"].as_str().is_some_and(|v| !v.is_empty())
            })
    });
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    assert!(!is_mount_point(&target));
}

/// A burst that overflows the kernel's queue becomes a gap record naming the volume, whose
/// span covers the whole time opens could have been lost: the queue (4,000 events) is larger
/// than one read of the listener, so the overflow is read several reads into the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_overflow_is_a_gap_record() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = setup();
    let audit = root.join("audit.jsonl");
    // A small queue for the groups created while it is set (this test's daemon only).
    struct QueueSize(String);
    impl Drop for QueueSize {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/fs/fanotify/max_queued_events", &self.0);
        }
    }
    const SYSCTL: &str = "/proc/sys/fs/fanotify/max_queued_events";
    let saved = QueueSize(std::fs::read_to_string(SYSCTL).unwrap());
    std::fs::write(SYSCTL, "4000").unwrap();
    // Notification mode: with permission events the burst would wait for the stopped
    // listener (and an overflow there would need as many openers blocked at once).
    let d = Daemon::start_opts(
        &root,
        "1h",
        &audit,
        &["--audit-opens", "notify-best-effort"],
    );
    drop(saved);
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 42);
    // 60 files: one process opening all of them queues 60 events that cannot merge.
    let objects: String = (0..60)
        .map(|i| format!("- objectName: p{i}\n  object: db\n  key: password\n"))
        .collect();
    node.node_publish_volume(pod.request_with(
        &root,
        &[("provider", "local"), ("objects", &objects)],
        None,
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let target = pod.target(&root);
    // The listener stalls (the daemon stopped) while 100 processes open the 60 files: 6,000
    // events for a queue of 4,000.
    let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid() as i32), sig);
    stop(nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Stopped once every thread is (until then the listener may still see the queue empty).
    let stat = |t: &std::path::Path| {
        std::fs::read_to_string(t.join("stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim().starts_with('T')))
            .unwrap_or(true)
    };
    wait_for("the node to stop", Duration::from_secs(120), || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .map(|ts| ts.flatten().all(|t| stat(&t.path())))
            .unwrap_or(true)
    });
    let stopped_at = std::time::SystemTime::now();
    let burst = std::panic::catch_unwind(|| {
        in_container(
            &root,
            "burst",
            &target,
            "for i in $(seq 100); do cat $V/p* > /dev/null || exit 5; done",
        )
    });
    let continued_at = std::time::SystemTime::now();
    stop(nix::sys::signal::Signal::SIGCONT).unwrap();
    burst.unwrap();
    let vid = format!("csi-{}", pod.uid);
    let mut detail = String::new();
    wait_for("a gap record", Duration::from_secs(120), || {
        audit_records(&audit).iter().any(|r| {
            r["event"] == "gap"
                && r["detail"].as_str().is_some_and(|d| {
                    detail = d.to_owned();
                    d.contains("fanotify queue overflowed") && d.contains(&vid)
                })
        })
    });
    // The span covers the whole time the opens could have been lost: from before the
    // listener stalled to after it ran again (not the microseconds of reading the overflow).
    let span: Vec<std::time::SystemTime> = detail
        .split(" between ")
        .nth(1)
        .and_then(|t| t.split(" may be missing").next())
        .map(|t| {
            t.split(" and ")
                .map(|x| humantime::parse_rfc3339(x).unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(span.len(), 2, "{detail}");
    assert!(
        span[0] <= stopped_at && span[1] >= continued_at,
        "the gap must span the stall ({stopped_at:?} to {continued_at:?}): {detail}"
    );
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
}

/// `--audit-fail-closed`: an open waits for its record; while the log cannot be written opens
/// are refused with EPERM (and the refusals recorded once it can), then served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_opens_while_the_log_is_unwritable() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = setup();
    let fs = SmallFs::new(&root.join("auditfs"), 512);
    let audit = fs.0.join("audit.jsonl");
    let d = Daemon::start_opts(&root, "1h", &audit, &["--audit-fail-closed"]);
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 43);
    node.node_publish_volume(pod.request_with(
        &root,
        &[
            ("provider", "local"),
            ("objects", OBJECTS),
            ("volumeType", "tmpfs"),
        ],
        None,
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let file = pod.target(&root).join("password");
    assert_eq!(read_file(&file).unwrap(), SECRET);
    let vid = format!("csi-{}", pod.uid);
    let (pid, _) = in_container(
        &root,
        "reader",
        &pod.target(&root),
        "read -r x < $V/password; [ -n \"$x\" ]",
    );
    let (n, _) = opens_of(&audit_records(&audit), &vid, pid);
    assert_eq!(
        n, 1,
        "the open's record was written before the open was allowed"
    );
    // Permission events are never merged: every open is counted.
    let (pid, _) = in_container(
        &root,
        "reader-30",
        &pod.target(&root),
        "for i in $(seq 30); do x=; read -r x < $V/password; [ -n \"$x\" ] || exit 3; done",
    );
    wait_for("30 opens accounted for", Duration::from_secs(120), || {
        opens_of(&audit_records(&audit), &vid, pid).0 == 30
    });

    fs.fill();
    wait_for("opens refused", Duration::from_secs(120), || {
        read_file(&file).is_err_and(|e| e.raw_os_error() == Some(libc::EPERM))
    });
    fs.unfill();
    wait_for("opens served again", Duration::from_secs(120), || {
        read_file(&file).is_ok()
    });
    wait_for("the refusals recorded", Duration::from_secs(120), || {
        audit_records(&audit).iter().any(|r| {
            r["event"] == "read"
                && r["outcome"] == "denied"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("audit log cannot be written"))
        })
    });
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
}
