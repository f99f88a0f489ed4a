//! Volumes survive the node process: a reader in its own mount namespace (a container's view,
//! through a bind mount of the target) opens, reads and closes a file every millisecond while
//! `keybroker node` is killed (-9) and restarted, stopped (SIGTERM) and restarted, and handed
//! over to a second process (the DaemonSet upgrade), 20 times each, on a FUSE and a tmpfs
//! volume. Not one read may fail; the longest pause is reported (BENCHMARKS.md, "Restarts").

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::node::{Daemon, Pod, client, local_setup};
use common::reader::Reader;
use common::{read_file, wait_for, write_atomic};

const DB: &str = "db-password-v1";
const REPEAT: usize = 20;
const OBJECTS: &str = "- objectName: db\n";

#[derive(Clone, Copy, Debug)]
enum Restart {
    /// No restart: the same time, for the baseline pause.
    None,
    Kill9,
    Sigterm,
    Handover,
}

fn start(root: &Path) -> Daemon {
    Daemon::start_opts(root, "1s", &root.join("audit.jsonl"), &[])
}

/// Replaces the node process the way `how` says; returns the new one.
fn restart(mut d: Daemon, root: &Path, how: Restart) -> Daemon {
    match how {
        Restart::None => {
            std::thread::sleep(Duration::from_millis(150));
            d
        }
        Restart::Kill9 => {
            d.kill9();
            d.replaced();
            start(root)
        }
        Restart::Sigterm => {
            d.stop();
            d.replaced();
            start(root)
        }
        Restart::Handover => {
            // The new process starts beside the old one and asks it for the volumes; the old
            // one exits once it has handed them over.
            let new = start(root);
            let status = d.replaced();
            assert!(
                status.success(),
                "the old process after handover: {status}\n{}",
                new.logs()
            );
            new
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_no_error_across_kill_9_sigterm_and_handover() {
    let (_tmp, root) = local_setup(DB, "[db]");
    let mut d = start(&root);
    let fuse = Pod::new("team-a", "api", 51);
    let tmpfs = Pod::new("team-a", "api", 52);
    {
        // kubelet's connection goes before any restart (else SIGTERM waits out its grace).
        let mut node = client(&d).await;
        node.node_publish_volume(fuse.request(&root, OBJECTS, "fuse", None))
            .await
            .unwrap();
        node.node_publish_volume(tmpfs.request(&root, OBJECTS, "tmpfs", None))
            .await
            .unwrap();
    }
    let mut report = Vec::new();
    for how in [
        Restart::None,
        Restart::Kill9,
        Restart::Sigterm,
        Restart::Handover,
    ] {
        let readers: Vec<(&str, Reader)> = [("fuse", &fuse), ("tmpfs", &tmpfs)]
            .into_iter()
            .map(|(kind, p)| {
                let view = root.join(format!("view-{kind}-{how:?}"));
                let stop = root.join(format!("stop-{kind}-{how:?}"));
                (kind, Reader::start(&p.target(&root), &view, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..REPEAT {
            d = restart(d, &root, how);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        for (kind, r) in readers {
            let v = r.finish();
            let line = format!(
                "{kind:5} {how:?}: {} reads, {} errors, longest open+read+close {:.1} ms",
                v["reads"],
                v["errors"],
                v["worst_ms"].as_f64().unwrap()
            );
            println!("restart_e2e: {line}");
            assert_eq!(v["errors"], 0, "{line}: {}\n{}", v["first"], d.logs());
            assert!(
                v["reads"].as_u64().unwrap() >= 200,
                "{line}: the reader hardly ran"
            );
            assert_eq!(v["seen"], serde_json::json!([DB]), "{line}");
            report.push(line);
        }
    }
    // Every restart took the FUSE session over (none remounted it), and every handover was
    // a clean exit of the old process.
    const TAKEN: &str = "FUSE session taken over after a keybroker restart";
    let audit = common::audit_text_when(&root.join("audit.jsonl"), "every takeover", |a| {
        a.matches(TAKEN).count() >= 3 * REPEAT
    });
    assert_eq!(audit.matches(TAKEN).count(), 3 * REPEAT, "{}", d.logs());
    assert!(!d.logs().contains("Containers that already had it mounted"));

    // Rotation keeps working in the last process, on both volumes.
    write_atomic(&root.join("secrets/db"), "db-password-v2");
    for p in [&fuse, &tmpfs] {
        let target = p.target(&root).join("db");
        wait_for(
            "rotation after the restarts",
            Duration::from_secs(10),
            || read_file(&target).is_ok_and(|v| v == "db-password-v2"),
        );
    }
    let mut node = client(&d).await;
    for p in [&fuse, &tmpfs] {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
    }
    println!("restart_e2e summary:\n{}", report.join("\n"));
}

/// The record's name for a target (and the keeper's name for its session).
fn record_key(target: &Path) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(target.as_os_str().as_encoded_bytes())[..12])
}

/// After a crash, the records, the keeper's descriptors and the kernel's mounts can disagree
/// (a crash in the middle of an unpublish, a keeper that lost a descriptor, a record half
/// written). The next process reconciles them, and audits what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_reconciles_records_keeper_and_mounts() {
    let (_tmp, root) = local_setup(DB, "[db]");
    let mut d = start(&root);
    let pods: Vec<Pod> = (61..64).map(|i| Pod::new("team-a", "api", i)).collect();
    {
        let mut node = client(&d).await;
        for p in &pods {
            node.node_publish_volume(p.request(&root, OBJECTS, "fuse", None))
                .await
                .unwrap();
        }
    }
    let [kept, unpublished, lost] = [&pods[0], &pods[1], &pods[2]];
    // A tmpfs volume unpublished during the crash too, and another node process's tmpfs volume
    // (its own state directory) beside this one's: recovery must tell its own from the other's.
    let tmpfs_gone = Pod::new("team-a", "api", 64);
    let (_tmp2, root2) = local_setup(DB, "[db]");
    let other = start(&root2);
    let neighbour = Pod::new("team-a", "api", 65);
    {
        let mut node = client(&d).await;
        node.node_publish_volume(tmpfs_gone.request(&root, OBJECTS, "tmpfs", None))
            .await
            .unwrap();
        let mut node2 = client(&other).await;
        node2
            .node_publish_volume(neighbour.request(&root2, OBJECTS, "tmpfs", None))
            .await
            .unwrap();
    }
    let keeper = d.keeper();
    assert_eq!(keeper.ping().unwrap(), 3);
    d.kill9();
    let records = root.join("state/volumes");
    // Crash points: an unpublish that had removed its record; a keeper that lost a session;
    // a record write cut short.
    for gone in [unpublished, &tmpfs_gone] {
        std::fs::remove_file(records.join(format!("{}.json", record_key(&gone.target(&root)))))
            .unwrap();
    }
    keeper.drop_fd(&record_key(&lost.target(&root))).unwrap();
    std::fs::write(records.join("0123.json.tmp"), "{\"volume_id\": \"cut").unwrap();
    let d = start(&root);
    let audit = common::audit_text_when(&root.join("audit.jsonl"), "the recovery", |a| {
        a.contains("FUSE session taken over after a keybroker restart")
            && a.contains("FUSE session of no recorded volume")
            && a.contains("no fd keeper kept its session")
    });
    // Taken over: served without a break.
    assert_eq!(read_file(&kept.target(&root).join("db")).unwrap(), DB);
    assert!(audit.contains("FUSE session taken over after a keybroker restart"));
    // Unpublished during the crash: its session is closed (kubelet's retried unpublish then
    // removes the dead mount).
    assert!(
        audit.contains("FUSE session of no recorded volume (unpublished during a restart) closed"),
        "{audit}"
    );
    // Lost by the keeper: remounted, and the break for running containers is said.
    assert!(audit.contains("no fd keeper kept its session"), "{audit}");
    assert_eq!(read_file(&lost.target(&root).join("db")).unwrap(), DB);
    assert_eq!(d.metric("keybroker_repairs_total"), 1);
    assert!(
        !records.join("0123.json.tmp").exists(),
        "half-written record left"
    );
    assert_eq!(keeper.ping().unwrap(), 2, "the keeper holds what is served");
    // The tmpfs volume of no record: its staging mount (this node's own) and its target bind
    // are detached, and that is audited; the other node's volume is untouched.
    assert!(!common::is_mount_point(&tmpfs_gone.target(&root)));
    let staging_left = std::fs::read_dir(root.join("state/staging"))
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        staging_left.iter().all(|p| !common::is_mount_point(p)),
        "staging mounts left: {staging_left:?}"
    );
    assert!(
        audit
            .contains("tmpfs volume of no recorded volume (unpublished during a restart) detached"),
        "{audit}"
    );
    assert_eq!(read_file(&neighbour.target(&root2).join("db")).unwrap(), DB);
    {
        let mut node2 = client(&other).await;
        node2
            .node_unpublish_volume(neighbour.unpublish(&root2))
            .await
            .unwrap();
    }
    drop(other);
    let mut node = client(&d).await;
    for p in pods.iter().chain([&tmpfs_gone]) {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
        assert!(!common::is_mount_point(&p.target(&root)), "{}", p.name);
    }
    assert_eq!(keeper.ping().unwrap(), 0);
}

/// In a pod (`--after-handover wait`), the old process does not exit after the handover (kubelet
/// would restart it, and it would ask the new one for the volumes back): it serves nothing and
/// waits for its pod's deletion (SIGTERM), then exits cleanly, leaving the volumes with the new
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_pod_the_old_process_waits_for_its_deletion_after_a_handover() {
    let (_tmp, root) = local_setup(DB, "[db]");
    let in_pod = ["--after-handover", "wait"];
    let audit = root.join("audit.jsonl");
    let mut old = Daemon::start_opts(&root, "1s", &audit, &in_pod);
    let p = Pod::new("team-a", "api", 71);
    {
        let mut node = client(&old).await;
        node.node_publish_volume(p.request(&root, OBJECTS, "fuse", None))
            .await
            .unwrap();
    }
    let new = Daemon::start_opts(&root, "1s", &audit, &in_pod);
    assert_eq!(read_file(&p.target(&root).join("db")).unwrap(), DB);
    std::thread::sleep(Duration::from_millis(500));
    let c = old.child.as_mut().unwrap();
    assert!(
        c.try_wait().unwrap().is_none(),
        "the old process exited after the handover"
    );
    assert!(
        old.http("/readyz").is_empty(),
        "the old process still answers /readyz after handing over"
    );
    old.stop();
    old.replaced();
    // The new process serves the volume, and rotation reaches it.
    write_atomic(&root.join("secrets/db"), "db-password-v3");
    let target = p.target(&root).join("db");
    wait_for(
        "rotation in the new process",
        Duration::from_secs(10),
        || read_file(&target).is_ok_and(|v| v == "db-password-v3"),
    );
    let mut node = client(&new).await;
    node.node_unpublish_volume(p.unpublish(&root))
        .await
        .unwrap();
    assert!(!common::is_mount_point(&p.target(&root)));
}

/// A server killed between reading a request and answering it: the kernel holds that request
/// as "being processed" by a server that no longer exists. The next process asks the kernel to
/// queue it again (`FUSE_NOTIFY_RESEND`), answers it, and the reader's `open` completes; the
/// open is audited by the process that answered it. (The first node reads an OPEN and never
/// answers it: a test-only switch of builds with the `test-controller` feature, as CI's.)
#[cfg(feature = "test-controller")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_killed_server_had_read_is_answered_by_the_next() {
    let (_tmp, root) = local_setup(DB, "[db]");
    let audit = root.join("audit.jsonl");
    let mut d = Daemon::start_env(
        &root,
        "1h",
        &audit,
        &[],
        &[("KEYBROKER_TEST_UNANSWERED_OPENS", "1")],
    );
    let p = Pod::new("team-a", "api", 81);
    {
        let mut node = client(&d).await;
        node.node_publish_volume(p.request(&root, OBJECTS, "fuse", None))
            .await
            .unwrap();
    }
    let mut cat = Command::new("cat")
        .arg(p.target(&root).join("db"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the unanswered OPEN", Duration::from_secs(120), || {
        d.logs().contains("an OPEN read and left unanswered")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(cat.try_wait().unwrap().is_none(), "the open was answered");
    d.kill9();
    d.replaced();
    let d = start(&root);
    let started = std::time::Instant::now();
    while cat.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the reader still waits for the request the dead server had read:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = cat.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), DB);
    let mut node = client(&d).await;
    node.node_unpublish_volume(p.unpublish(&root))
        .await
        .unwrap();
    drop(node);
    let mut d = d;
    d.stop();
    let records = std::fs::read_to_string(&audit).unwrap();
    assert!(
        records
            .lines()
            .any(|l| l.contains("\"event\":\"read\"") && l.contains("\"comm\":\"cat\"")),
        "the resent open is audited by the process that answered it:\n{records}"
    );
}

/// A volume that did not name its type keeps the type it was mounted with across a restart in
/// which the node's default changed (an upgrade from a FUSE default to the tmpfs one): its
/// FUSE session is taken over, not replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_another_default_type_keeps_each_volume_its_type() {
    let (_tmp, root) = local_setup(DB, "[db]");
    let audit = root.join("audit.jsonl");
    let mut d = Daemon::start_opts(&root, "1h", &audit, &["--default-volume-type", "fuse"]);
    let p = Pod::new("team-a", "api", 91);
    {
        let mut node = client(&d).await;
        let req = p.request_with(&root, &[("provider", "local"), ("objects", OBJECTS)], None);
        assert!(!req.volume_context.contains_key("volumeType"));
        node.node_publish_volume(req).await.unwrap();
    }
    d.kill9();
    d.replaced();
    let d = start(&root);
    assert!(
        d.logs().contains("FUSE session taken over after restart"),
        "{}",
        d.logs()
    );
    assert_eq!(d.metric("keybroker_repairs_total"), 0);
    assert_eq!(read_file(&p.target(&root).join("db")).unwrap(), DB);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = p.target(&root);
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(target.to_str().unwrap()) && l.contains(" - fuse.keybroker ")),
        "still a FUSE volume:\n{mounts}"
    );
    let mut node = client(&d).await;
    node.node_unpublish_volume(p.unpublish(&root))
        .await
        .unwrap();
}

/// A process killed when dropped (a test's fd keeper, however the test ends).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The DaemonSet's layout without a cluster: the fd keeper a process of its own in a pid
/// namespace of its own (its pod's), keybroker with `--fd-keeper external` in the host's (its
/// pod has `hostPID`), so the keeper cannot see keybroker's pid. kill -9 of keybroker and a new
/// process: the FUSE volume keeps its connection, and the CSI socket is the same file,
/// listening throughout (the keeper keeps it): a call made while no keybroker runs waits in
/// the socket's queue and the next process answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_keeper_in_its_own_pid_namespace_keeps_sessions_and_sockets() {
    use std::os::unix::fs::MetadataExt;
    let (_tmp, root) = local_setup(DB, "[db]");
    std::fs::create_dir_all(root.join("keeper")).unwrap();
    let keeper_sock = root.join("keeper/keeper.sock");
    let _keeper = Killed(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                common::BIN,
                "fd-keeper",
                "--socket",
            ])
            .arg(&keeper_sock)
            .stderr(std::fs::File::create(root.join("keeper.log")).unwrap())
            .spawn()
            .expect("unshare (util-linux)"),
    );
    // The test's own pid is as invisible to the keeper as keybroker's: `ping` is answered.
    let keeper = keybroker::keeper::KeeperClient::new(&keeper_sock);
    wait_for("the keeper answers", Duration::from_secs(60), || {
        keeper.ping().is_ok()
    });
    let socket = keeper_sock.to_str().unwrap();
    let external = ["--fd-keeper", "external", "--fd-keeper-socket", socket];
    let audit = root.join("audit.jsonl");
    let d = Daemon::start_opts(&root, "1s", &audit, &external);
    let p = Pod::new("team-a", "api", 81);
    client(&d)
        .await
        .node_publish_volume(p.request(&root, OBJECTS, "fuse", None))
        .await
        .unwrap();
    let target = p.target(&root).join("db");
    assert_eq!(read_file(&target).unwrap(), DB);
    // The session and the CSI socket (1 + 1; no registration socket outside a cluster).
    assert_eq!(keeper.ping().unwrap(), 2, "{}", d.logs());
    let inode = std::fs::metadata(&d.sock).unwrap().ino();

    let mut d = d;
    d.kill9();
    d.replaced();
    // No keybroker runs: a call now waits in the kept socket's queue.
    let sock = root.join("csi/csi.sock");
    let waiting = tokio::spawn(async move {
        let channel = keybroker_csi::connect_unix(&sock).await?;
        keybroker_csi::pb::node_client::NodeClient::new(channel)
            .node_get_info(keybroker_csi::pb::NodeGetInfoRequest {})
            .await
            .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "answered while no keybroker ran");
    let d = Daemon::start_opts(&root, "1s", &audit, &external);
    let info = tokio::time::timeout(Duration::from_secs(120), waiting)
        .await
        .expect("the queued call is answered")
        .unwrap()
        .unwrap_or_else(|e| panic!("the queued call: {e}\n{}", d.logs()));
    assert_eq!(info.into_inner().node_id, "test-node");
    assert_eq!(
        std::fs::metadata(&d.sock).unwrap().ino(),
        inode,
        "the same socket file"
    );
    // The FUSE volume was never disconnected.
    assert_eq!(read_file(&target).unwrap(), DB);
    assert!(
        d.logs()
            .contains("serving on the socket the fd keeper kept"),
        "{}",
        d.logs()
    );
    client(&d)
        .await
        .node_unpublish_volume(p.unpublish(&root))
        .await
        .unwrap();
    assert!(!common::is_mount_point(&p.target(&root)));
    let mut d = d;
    d.stop();
    // The socket file stays for the next process (the keeper keeps it listening).
    assert_eq!(std::fs::metadata(&d.sock).unwrap().ino(), inode);
    let _ = keeper.quit();
}
