//! Every audited read names its process, however short the reader's life and however busy the
//! machine (issue #24): short-lived `cat`s of a tmpfs volume (through the target and through
//! another mount namespace) and of a FUSE volume, and one-call broker API clients, all while a
//! CPU burner keeps every core busy. Each record must carry the command, the executable, the
//! pod and the container (from the reader's cgroup) and the cgroup itself.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::load::{CpuBurner, PodCgroup};
use common::node::*;
use common::*;

const SECRET: &str = "S3cret-attribution-77";
const OBJECTS: &str = "- objectName: password\n  object: db\n  key: password\n";
/// The readers' container (its cgroup under the pod's, as containerd names them).
const CONTAINER: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// Runs `body` (sh) inside `cgroup`; panics with its output if it fails.
fn in_cgroup(cgroup: &Path, body: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{}{body}", PodCgroup::enter(cgroup)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{body}: {text}");
    text
}

/// The read records of volume `vid` whose detail is `detail` (None: any), and how many reads
/// they stand for (a record with `count` stands for that many).
fn reads(audit: &Path, vid: &str, detail: Option<&str>) -> (u64, Vec<serde_json::Value>) {
    let mine: Vec<serde_json::Value> = audit_records(audit)
        .into_iter()
        .filter(|r| {
            r["event"] == "read"
                && r["volume"] == vid
                && detail.is_none_or(|d| r["detail"].as_str() == Some(d))
        })
        .collect();
    let n = mine.iter().map(|r| r["count"].as_u64().unwrap_or(1)).sum();
    (n, mine)
}

/// Every record names the process completely: command `comm`, an executable ending in
/// `/comm`, the pod, the container and a cgroup under the pod's.
fn assert_attributed(what: &str, records: &[serde_json::Value], comm: &str, pod_uid: &str) {
    let incomplete: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            let p = &r["process"];
            !(p["comm"] == comm
                && p["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with(&format!("/{comm}")))
                && p["pod_uid"] == pod_uid
                && p["container"] == CONTAINER
                && p["cgroup"]
                    .as_str()
                    .is_some_and(|c| c.contains(pod_uid) && c.ends_with(CONTAINER)))
        })
        .collect();
    assert!(
        incomplete.is_empty(),
        "{what}: {} of {} records do not name their process completely, e.g. {}",
        incomplete.len(),
        records.len(),
        incomplete[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_short_lived_reader_is_named_while_every_core_is_busy() {
    let (_tmp, root) = local_setup(&format!(r#"{{"password":"{SECRET}"}}"#), "[db]");
    let audit = root.join("audit.jsonl");
    // The node's defaults: tmpfs opens attributed in identify mode.
    let d = Daemon::start_opts(&root, "1h", &audit, &[]);
    let mut node = client(&d).await;
    let tmpfs_pod = Pod::new("team-a", "api", 91);
    let fuse_pod = Pod::new("team-a", "api", 92);
    let mut tmpfs_cg = PodCgroup::new(&tmpfs_pod.uid);
    let tmpfs_container = tmpfs_cg.container(CONTAINER);
    let mut fuse_cg = PodCgroup::new(&fuse_pod.uid);
    let fuse_container = fuse_cg.container(CONTAINER);
    for (pod, attrs) in [
        (&tmpfs_pod, vec![("volumeType", "tmpfs"), ("api", "true")]),
        (&fuse_pod, vec![("volumeType", "fuse")]),
    ] {
        let mut all = vec![("provider", "local"), ("objects", OBJECTS)];
        all.extend(attrs);
        node.node_publish_volume(pod.request_with(&root, &all, None))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    }
    let tmpfs = tmpfs_pod.target(&root);
    let fuse = fuse_pod.target(&root);
    // A socket address holds at most 107 bytes: clients connect through a short link.
    let sock = root.join("api.sock");
    std::os::unix::fs::symlink(tmpfs.join("..keybroker.sock"), &sock).unwrap();
    let view = root.join("view");
    std::fs::create_dir_all(&view).unwrap();
    let harness = common::peers::peers_bin("driver-harness");
    assert!(
        harness.exists(),
        "{} is missing: scripts/install-peers.sh builds it",
        harness.display()
    );

    let burner = CpuBurner::start();
    // tmpfs: 500 readers through the target, 500 through a container's own mount namespace
    // (a bind of the target, as kubelet gives a container), each `cat` its own process.
    in_cgroup(
        &tmpfs_container,
        &format!(
            "for i in $(seq 500); do cat {t}/password > /dev/null || exit 5; done; \
             unshare --mount --propagation private -- sh -c 'mount --bind {t} {v} && \
             for i in $(seq 500); do cat {v}/password > /dev/null || exit 6; done'",
            t = tmpfs.display(),
            v = view.display()
        ),
    );
    // FUSE: 200 readers.
    in_cgroup(
        &fuse_container,
        &format!(
            "for i in $(seq 200); do cat {}/password > /dev/null || exit 7; done",
            fuse.display()
        ),
    );
    // The broker API: 100 one-call clients.
    let said = in_cgroup(
        &tmpfs_container,
        &format!(
            "for i in $(seq 100); do {} -broker-get {} -name password || exit 8; done",
            harness.display(),
            sock.display()
        ),
    );
    assert_eq!(said.matches("reply=").count(), 100, "{said}");
    drop(burner);

    let tmpfs_vid = format!("csi-{}", tmpfs_pod.uid);
    let fuse_vid = format!("csi-{}", fuse_pod.uid);
    // Records are written after the opens were allowed: wait for all of them.
    wait_for("every read recorded", Duration::from_secs(120), || {
        reads(&audit, &tmpfs_vid, None).0 == 1100 && reads(&audit, &fuse_vid, None).0 == 200
    });
    let (n, opens) = reads(&audit, &tmpfs_vid, None);
    let opens: Vec<serde_json::Value> = opens
        .into_iter()
        .filter(|r| r["detail"] != "broker Get")
        .collect();
    assert_eq!(n, 1100);
    assert_eq!(
        opens.len(),
        1000,
        "one record per cat (each its own process)"
    );
    assert_attributed("tmpfs opens", &opens, "cat", &tmpfs_pod.uid);
    let (_, fuse_opens) = reads(&audit, &fuse_vid, None);
    assert_eq!(fuse_opens.len(), 200);
    assert_attributed("FUSE opens", &fuse_opens, "cat", &fuse_pod.uid);
    let (gets, get_records) = reads(&audit, &tmpfs_vid, Some("broker Get"));
    assert_eq!(gets, 100);
    assert_attributed(
        "broker Gets",
        &get_records,
        "driver-harness",
        &tmpfs_pod.uid,
    );
    assert!(
        !std::fs::read_to_string(&audit).unwrap().contains(SECRET),
        "never the value"
    );
    assert_audit_schema(std::slice::from_ref(&audit));
    for pod in [&tmpfs_pod, &fuse_pod] {
        node.node_unpublish_volume(pod.unpublish(&root))
            .await
            .unwrap();
        assert!(!is_mount_point(&pod.target(&root)));
    }
}
