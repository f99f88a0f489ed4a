//! No single process death loses a FUSE volume: the holes of issue #21, each tried the way it
//! happens on a node, with the chart's process layout (one fd keeper per node in a pid
//! namespace of its own, as its DaemonSet runs it; node processes with `--fd-keeper external`
//! and `--after-handover wait`, sharing the state directory and so the handover socket).
//! Readers in their own mount namespaces read a FUSE and a tmpfs volume every millisecond
//! throughout; not one read may fail. The longest pause of each case is printed
//! (BENCHMARKS.md, "Restart holes").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::node::{Daemon, Pod, client, local_setup};
use common::reader::Reader;
use common::{audit_records, read_file, wait_for, write_atomic};

const DB: &str = "db-password-v1";
const OBJECTS: &str = "- objectName: db\n";
/// One case at a time: their pauses are what they measure.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The node's fd keeper, as the chart runs it: its own pid namespace (it cannot see the node's
/// pids), its socket in a directory of its own.
struct Keeper {
    child: Option<Child>,
    sock: PathBuf,
}

impl Keeper {
    fn start(root: &Path) -> Self {
        let dir = root.join("keeper");
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("keeper.sock");
        let log = root.join("keeper.log");
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", common::BIN, "fd-keeper"])
            .arg("--socket")
            .arg(&sock)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("unshare (util-linux)");
        Self {
            child: Some(child),
            sock,
        }
    }

    fn client(&self) -> keybroker::keeper::KeeperClient {
        keybroker::keeper::KeeperClient::new(&self.sock)
    }

    /// kill -9 of the keeper (its pid namespace's init goes, and the keeper with it).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_for("the keeper gone", Duration::from_secs(120), || {
            self.client().ping().is_err()
        });
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.client().quit();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The node's arguments in the chart's layout, and the test's stall file for the handover.
fn node_args(root: &Path) -> Vec<String> {
    vec![
        "--fd-keeper".into(),
        "external".into(),
        "--fd-keeper-socket".into(),
        root.join("keeper/keeper.sock").display().to_string(),
        "--after-handover".into(),
        "wait".into(),
    ]
}

fn spawn_node(root: &Path, wait: bool) -> Daemon {
    let args = node_args(root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stall = root.join("stall");
    Daemon::spawn_env(
        root,
        "1s",
        &root.join("audit.jsonl"),
        &args,
        &[(
            "KEYBROKER_TEST_HANDOVER_STALL_FILE",
            stall.to_str().unwrap(),
        )],
        wait,
    )
}

/// A FUSE and a tmpfs volume published by `d`, and a reader on each.
struct Volumes {
    fuse: Pod,
    tmpfs: Pod,
}

impl Volumes {
    async fn publish(d: &Daemon, root: &Path, first: usize) -> Self {
        let fuse = Pod::new("team-a", "api", first);
        let tmpfs = Pod::new("team-a", "api", first + 1);
        let mut node = client(d).await;
        for (p, kind) in [(&fuse, "fuse"), (&tmpfs, "tmpfs")] {
            node.node_publish_volume(p.request(root, OBJECTS, kind, None))
                .await
                .unwrap_or_else(|e| panic!("publish: {e:?}\n{}", d.logs()));
        }
        Self { fuse, tmpfs }
    }

    fn readers(&self, root: &Path, case: &str) -> Vec<(&'static str, Reader)> {
        [("fuse", &self.fuse), ("tmpfs", &self.tmpfs)]
            .into_iter()
            .map(|(kind, p)| {
                let view = root.join(format!("view-{kind}-{case}"));
                let stop = root.join(format!("stop-{kind}-{case}"));
                (kind, Reader::start(&p.target(root), &view, stop))
            })
            .collect()
    }

    /// Rotation reaches both volumes through `d`, then kubelet unpublishes them: nothing is
    /// left (no mount, no record, no session at the keeper).
    async fn rotate_and_unpublish(&self, d: &Daemon, root: &Path, keeper: &Keeper, value: &str) {
        write_atomic(&root.join("secrets/db"), value);
        for p in [&self.fuse, &self.tmpfs] {
            let target = p.target(root).join("db");
            wait_for("rotation", Duration::from_secs(120), || {
                read_file(&target).is_ok_and(|v| v == value)
            });
        }
        let mut node = client(d).await;
        for p in [&self.fuse, &self.tmpfs] {
            node.node_unpublish_volume(p.unpublish(root))
                .await
                .unwrap_or_else(|e| panic!("unpublish: {e:?}\n{}", d.logs()));
            assert!(!common::is_mount_point(&p.target(root)));
        }
        for dir in ["state/volumes", "state/volume-copies"] {
            let left = std::fs::read_dir(root.join(dir)).unwrap().count();
            assert_eq!(left, 0, "no record is left in {dir}");
        }
        // Only the listening CSI socket stays kept.
        assert_eq!(keeper.client().ping().unwrap(), 1, "{}", d.logs());
    }
}

/// Stops the readers; every one must have read without an error. Returns report lines.
fn finish(readers: Vec<(&'static str, Reader)>, case: &str, d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for (kind, r) in readers {
        let v = r.finish();
        let line = format!(
            "{kind:5} {case}: {} reads, {} errors, longest open+read+close {:.1} ms",
            v["reads"],
            v["errors"],
            v["worst_ms"].as_f64().unwrap()
        );
        println!("restart_holes_e2e: {line}");
        assert_eq!(v["errors"], 0, "{line}: {}\n{}", v["first"], d.logs());
        assert!(
            v["reads"].as_u64().unwrap() > 0,
            "{line}: the reader never read"
        );
        out.push(line);
    }
    out
}

fn sigterm(d: &mut Daemon) {
    if let Some(c) = d.child.as_ref() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Whether `d`'s process has exited.
fn exited(d: &mut Daemon) -> bool {
    d.child
        .as_mut()
        .is_none_or(|c| c.try_wait().ok().flatten().is_some())
}

/// Case 1: an upgrade while the old node is down (crash-looping, OOM-killed): the new node
/// finds a stale handover socket and nobody answering; the keeper has every session.
/// Also the old node killed the moment the new one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_the_old_node_down_keeps_every_volume() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let keeper = Keeper::start(&root);
    let mut d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 101).await;
    let readers = v.readers(&root, "old-node-down");
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..3 {
        // The old node is dead when the new one starts ...
        d.kill9();
        d.replaced();
        d = spawn_node(&root, true);
        // ... or dies as the new one starts (0 ms).
        let mut new = spawn_node(&root, false);
        d.kill9();
        d.replaced();
        new.wait_ready();
        d = new;
        println!("restart_holes_e2e: old node down, round {round} done");
    }
    std::thread::sleep(Duration::from_millis(200));
    finish(readers, "upgrade-old-node-down", &d);
    assert!(
        !d.logs().contains("no fd keeper kept its session"),
        "{}",
        d.logs()
    );
    v.rotate_and_unpublish(&d, &root, &keeper, "db-password-v2")
        .await;
}

/// The stages case 2 stalls the old side at exist only in a test-controller build: without
/// them its "send" and "commit" rounds kill at some other moment and prove nothing.
fn require_test_controller() {
    #[cfg(not(feature = "test-controller"))]
    panic!("run with --features test-controller (scripts/test.sh does)");
}

/// Case 2: either process killed at any point of a handover. The new node killed 0, 2, 5, 8,
/// 16 and 50 ms after it starts, while the new side has connected but not yet asked, while
/// the old side is paused (before it sends the sessions) and committing (after `took`); the
/// same for the old node. Whatever dies, the
/// survivor (or the restarted new node) serves every volume; readers never see an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_death_at_any_point_of_a_handover_loses_nothing() {
    require_test_controller();
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let keeper = Keeper::start(&root);
    let mut d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 111).await;
    let readers = v.readers(&root, "handover-deaths");
    std::thread::sleep(Duration::from_millis(200));
    let stall = root.join("stall");
    // (who dies, when): offsets after the new node starts, or a stage of the old side.
    let mut points: Vec<(&str, String)> = Vec::new();
    for who in ["new", "old"] {
        for ms in [0, 2, 5, 8, 16, 50] {
            points.push((who, format!("{ms} ms")));
        }
        for stage in ["connected", "send", "commit"] {
            points.push((who, stage.into()));
        }
    }
    for (who, when) in &points {
        let staged = matches!(when.as_str(), "connected" | "send" | "commit");
        std::fs::write(
            &stall,
            if staged {
                format!("{when} 400")
            } else {
                String::new()
            },
        )
        .unwrap();
        // Every node process logs to the same file: count what this round adds.
        let stalls = d.logs().matches("handover stalled").count();
        let mut new = spawn_node(&root, false);
        if staged {
            wait_for("the stall", Duration::from_secs(120), || {
                d.logs().matches("handover stalled").count() > stalls
            });
        } else {
            let ms: u64 = when.trim_end_matches(" ms").parse().unwrap();
            std::thread::sleep(Duration::from_millis(ms));
        }
        std::fs::write(&stall, "").unwrap();
        if *who == "new" {
            new.kill9();
            new.replaced();
            // The new pod's container restarts: it asks again (the old node rolled back) or
            // takes the sessions from the keeper (the old node had committed).
            let again = spawn_node(&root, true);
            // `again` is ready: the old node rolled back and then handed over to it, or had
            // committed (and `again` took the sessions from the keeper). Either way it waits
            // for its pod's deletion now.
            sigterm(&mut d);
            wait_for("the old node to exit", Duration::from_secs(120), || {
                exited(&mut d)
            });
            d.replaced();
            d = again;
        } else {
            d.kill9();
            d.replaced();
            new.wait_ready();
            d = new;
        }
        println!("restart_holes_e2e: {who} node killed at {when}: served on");
    }
    std::thread::sleep(Duration::from_millis(200));
    let lines = finish(readers, "handover-deaths", &d);
    let rolled_back = audit_records(&root.join("audit.jsonl"))
        .iter()
        .filter(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|t| t.contains("handover to a newer keybroker process rolled back"))
        })
        .count();
    println!(
        "restart_holes_e2e: {} kill points, {rolled_back} handovers rolled back; {}",
        points.len(),
        lines.join("; ")
    );
    assert!(
        rolled_back > 0,
        "no kill point fell inside a handover (none rolled back)"
    );
    assert!(!d.logs().contains("no fd keeper kept its session"));
    // The old node killed while the new one had connected but not yet asked: the request
    // finds the connection reset, and the new node asks again (nobody answers).
    assert!(
        d.logs().contains("went away before reading the request"),
        "the 'connected' round did not reach the reset connection:\n{}",
        d.logs()
    );
    v.rotate_and_unpublish(&d, &root, &keeper, "db-password-v2")
        .await;
}

/// Case 3: a crash right after a keeper restart. The node learns of the keeper's death at
/// once (its `watch` connection) and gives every session to the new keeper as soon as it
/// listens; the node is killed the moment the keeper holds them. Printed: how long after the
/// keeper answered it held every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_keeper_gets_every_session_at_once() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let mut keeper = Keeper::start(&root);
    let mut d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 121).await;
    // A second FUSE volume: "every session", not one.
    let extra = Pod::new("team-a", "api", 123);
    client(&d)
        .await
        .node_publish_volume(extra.request(&root, OBJECTS, "fuse", None))
        .await
        .unwrap();
    let held = keeper.client().ping().unwrap();
    assert_eq!(held, 3, "two sessions and the CSI socket");
    let readers = v.readers(&root, "keeper-restart");
    std::thread::sleep(Duration::from_millis(200));
    let mut given_ms = Vec::new();
    for _ in 0..5 {
        keeper.kill();
        let started = Instant::now();
        keeper = Keeper::start(&root);
        let c = keeper.client();
        wait_for("the new keeper answers", Duration::from_secs(120), || {
            c.ping().is_ok()
        });
        let answered = started.elapsed();
        wait_for(
            "the new keeper holds every session",
            Duration::from_secs(120),
            || c.ping().is_ok_and(|n| n == held),
        );
        given_ms.push((
            answered.as_secs_f64() * 1000.0,
            started.elapsed().as_secs_f64() * 1000.0,
        ));
        // The crash that used to lose every session (within 5 s of a keeper restart).
        d.kill9();
        d.replaced();
        d = spawn_node(&root, true);
    }
    std::thread::sleep(Duration::from_millis(200));
    finish(readers, "keeper-restart-then-crash", &d);
    println!(
        "restart_holes_e2e: a restarted keeper (ms after its process started: first answer / every session held): {}",
        given_ms
            .iter()
            .map(|(a, h)| format!("{a:.1}/{h:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Given by the watcher, not by a timer: each restart is one sync, logged as such.
    assert!(d.metric("keybroker_keeper_syncs_total") >= 1);
    const TAKEN: &str = "FUSE session taken over after a keybroker restart";
    let audit = common::audit_text_when(&root.join("audit.jsonl"), "every takeover", |a| {
        a.matches(TAKEN).count() >= 2 * 5
    });
    assert_eq!(
        audit.matches(TAKEN).count(),
        2 * 5,
        "both FUSE sessions taken over at each of the 5 crashes"
    );
    client(&d)
        .await
        .node_unpublish_volume(extra.unpublish(&root))
        .await
        .unwrap();
    v.rotate_and_unpublish(&d, &root, &keeper, "db-password-v2")
        .await;
}

/// Case 4: the keeper gone for good. `/readyz` says not ready and why, the metric counts the
/// sessions no keeper holds, new publishes still work; a keeper back makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_keeper_the_node_is_not_ready_and_says_why() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let mut keeper = Keeper::start(&root);
    let d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 131).await;
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 0);
    keeper.kill();
    let mut page = String::new();
    wait_for("/readyz 503", Duration::from_secs(120), || {
        page = d.http("/readyz");
        page.starts_with("HTTP/1.1 503")
    });
    assert!(
        page.contains("1 FUSE sessions are not held by an fd keeper")
            && page.contains("does not answer"),
        "{page}"
    );
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 1);
    // Publishing still works (the volume serves); it is one more session at risk.
    let late = Pod::new("team-a", "api", 133);
    client(&d)
        .await
        .node_publish_volume(late.request(&root, OBJECTS, "fuse", None))
        .await
        .unwrap();
    assert_eq!(read_file(&late.target(&root).join("db")).unwrap(), DB);
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 2);
    let keeper = Keeper::start(&root);
    wait_for("/readyz 200", Duration::from_secs(120), || {
        d.http("/readyz").starts_with("HTTP/1.1 200")
    });
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 0);
    assert_eq!(keeper.client().ping().unwrap(), 3);
    assert!(d.metric("keybroker_keeper_syncs_total") >= 2);
    client(&d)
        .await
        .node_unpublish_volume(late.unpublish(&root))
        .await
        .unwrap();
    v.rotate_and_unpublish(&d, &root, &keeper, "db-password-v2")
        .await;
}

/// The record's name for a target (and the keeper's name for its session).
fn record_key(target: &Path) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(target.as_os_str().as_encoded_bytes())[..12])
}

/// Case 5: a damaged volume record. Damaged alone, its copy serves: readers see nothing.
/// Damaged with its copy, the live session is kept (never closed) until kubelet's next
/// publish of the target serves it again, or its unpublish closes it; both audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_never_closes_a_live_session() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let keeper = Keeper::start(&root);
    let mut d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 141).await;
    let record = |p: &Pod| {
        root.join("state/volumes")
            .join(format!("{}.json", record_key(&p.target(&root))))
    };
    let copy = |p: &Pod| {
        root.join("state/volume-copies")
            .join(format!("{}.json", record_key(&p.target(&root))))
    };
    let truncate = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
    };
    // The record alone: its copy is used.
    let readers = v.readers(&root, "damaged-record");
    std::thread::sleep(Duration::from_millis(200));
    d.kill9();
    d.replaced();
    truncate(&record(&v.fuse));
    truncate(&record(&v.tmpfs));
    d = spawn_node(&root, true);
    std::thread::sleep(Duration::from_millis(200));
    finish(readers, "damaged-record", &d);
    let audit = root.join("audit.jsonl");
    let from_copy = audit_records(&audit)
        .iter()
        .filter(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|t| t.contains("damaged; taken over from its copy"))
        })
        .count();
    assert_eq!(from_copy, 2, "{}", d.logs());

    // The record and its copy: the session is kept until kubelet publishes the target again.
    d.kill9();
    d.replaced();
    truncate(&record(&v.fuse));
    truncate(&copy(&v.fuse));
    d = spawn_node(&root, true);
    assert!(
        d.logs().contains("its live FUSE session is kept"),
        "{}",
        d.logs()
    );
    // The keeper still holds it (the tmpfs volume needs none): session + CSI socket.
    assert_eq!(keeper.client().ping().unwrap(), 2, "{}", d.logs());
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 0);
    // A container's reader waits (no error) until kubelet's republish.
    let readers: Vec<(&str, Reader)> = v
        .readers(&root, "damaged-record-and-copy")
        .into_iter()
        .filter(|(k, _)| *k == "fuse")
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let republished = Instant::now();
    client(&d)
        .await
        .node_publish_volume(v.fuse.request(&root, OBJECTS, "fuse", None))
        .await
        .unwrap_or_else(|e| panic!("republish: {e:?}\n{}", d.logs()));
    wait_for(
        "the FUSE volume served again",
        Duration::from_secs(120),
        || read_file(&v.fuse.target(&root).join("db")).is_ok_and(|s| s == DB),
    );
    println!(
        "restart_holes_e2e: the kept session served {:.1} ms after the republish",
        republished.elapsed().as_secs_f64() * 1000.0
    );
    std::thread::sleep(Duration::from_millis(200));
    finish(readers, "damaged-record-and-copy", &d);
    // The writer thread writes the record a moment after the call returned (a busy machine
    // can make that moment long).
    let recorded = |what: &str| {
        audit_records(&audit)
            .iter()
            .any(|r| r["detail"].as_str().is_some_and(|t| t.contains(what)))
    };
    wait_for("the served-again record", Duration::from_secs(120), || {
        recorded("kept for a damaged record served again")
    });
    // Damaged again, and this time kubelet unpublishes: closed, nothing left.
    d.kill9();
    d.replaced();
    truncate(&record(&v.fuse));
    truncate(&copy(&v.fuse));
    d = spawn_node(&root, true);
    client(&d)
        .await
        .node_unpublish_volume(v.fuse.unpublish(&root))
        .await
        .unwrap();
    assert!(!common::is_mount_point(&v.fuse.target(&root)));
    wait_for("the closed record", Duration::from_secs(120), || {
        recorded("kept for a damaged record closed at kubelet's unpublish")
    });
    client(&d)
        .await
        .node_unpublish_volume(v.tmpfs.unpublish(&root))
        .await
        .unwrap();
    assert_eq!(keeper.client().ping().unwrap(), 1, "only the CSI socket");
    assert_eq!(
        std::fs::read_dir(root.join("state/volume-copies"))
            .unwrap()
            .count(),
        0
    );
}

/// The keeper killed at random moments while pods come and go (a publish/unpublish storm):
/// afterwards the keeper holds exactly the live sessions, a crash of the node loses none, and
/// nothing is left once the pods are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_killed_during_a_publish_storm_ends_up_holding_every_session() {
    let _serial = SERIAL.lock().await;
    let (_tmp, root) = local_setup(DB, "[db]");
    let mut keeper = Keeper::start(&root);
    let mut d = spawn_node(&root, true);
    let v = Volumes::publish(&d, &root, 151).await;
    let readers = v.readers(&root, "keeper-storm");
    let pods: Vec<Pod> = (0..8).map(|i| Pod::new("team-a", "api", 160 + i)).collect();
    let storm = {
        let root = root.clone();
        let sock = d.sock.clone();
        tokio::spawn(async move {
            let channel = keybroker_csi::connect_unix(&sock).await.unwrap();
            let mut node = keybroker_csi::pb::node_client::NodeClient::new(channel);
            let pods: Vec<Pod> = (0..8).map(|i| Pod::new("team-a", "api", 160 + i)).collect();
            let mut published = vec![false; pods.len()];
            for round in 0..120 {
                let i = (round * 5) % pods.len();
                if published[i] {
                    node.node_unpublish_volume(pods[i].unpublish(&root))
                        .await
                        .unwrap();
                } else {
                    node.node_publish_volume(pods[i].request(&root, OBJECTS, "fuse", None))
                        .await
                        .unwrap();
                }
                published[i] = !published[i];
            }
            published
        })
    };
    let mut kills = 0;
    while !storm.is_finished() {
        std::thread::sleep(Duration::from_millis(fastrand::u64(5..120)));
        keeper.kill();
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..50)));
        keeper = Keeper::start(&root);
        kills += 1;
    }
    let published = storm.await.unwrap();
    let live = published.iter().filter(|p| **p).count();
    // Every live session (the storm's, the reader's FUSE volume) and the CSI socket.
    let c = keeper.client();
    let want = live + 1 + 1;
    wait_for(
        "the keeper holds every session",
        Duration::from_secs(120),
        || c.ping().is_ok_and(|n| n == want),
    );
    wait_for("/readyz 200", Duration::from_secs(120), || {
        d.http("/readyz").starts_with("HTTP/1.1 200")
    });
    d.kill9();
    d.replaced();
    d = spawn_node(&root, true);
    std::thread::sleep(Duration::from_millis(200));
    finish(readers, "keeper-killed-in-a-storm", &d);
    println!(
        "restart_holes_e2e: keeper killed {kills} times during 120 publishes/unpublishes; {live} storm volumes live"
    );
    for (p, live) in pods.iter().zip(&published) {
        if *live {
            assert_eq!(read_file(&p.target(&root).join("db")).unwrap(), DB);
            client(&d)
                .await
                .node_unpublish_volume(p.unpublish(&root))
                .await
                .unwrap();
        }
        assert!(!common::is_mount_point(&p.target(&root)));
    }
    v.rotate_and_unpublish(&d, &root, &keeper, "db-password-v2")
        .await;
}
