//! `keybroker node` driven as kubelet drives it: a gRPC client on the CSI unix socket publishes
//! and unpublishes volumes for pods with service-account tokens, other processes and uids read
//! the files, and the daemon is restarted under live volumes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::*;
use common::*;
use tonic::Code;

const NOBODY: u32 = 65534;
const A_DB: &str = r#"{"username":"app","password":"S3cret-team-a-db-9e1"}"#;
const A_KEY: &str = "S3cret-team-a-api-key-77";
const B_TOKEN: &str = "S3cret-team-b-token-31";

fn bindings_yaml(dir: &Path, with_team_b: bool) -> String {
    let mut s = format!(
        "bindings:\n  - name: team-a-dev\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {{local: {{path: {}}}}}\n    objects: [db, api-key]\n",
        dir.join("secrets-a").display()
    );
    // A Vault binding whose server the tests never reach (see vault_e2e.rs for real ones).
    s.push_str("  - name: team-v\n    namespace: team-v\n    serviceAccounts: [app]\n    identity: {vault: {address: \"https://vault:8200\", authMount: jwt, role: app}}\n    objects: [\"secret/data/*\"]\n");
    if with_team_b {
        s.push_str(&format!(
            "  - name: team-b-dev\n    namespace: team-b\n    serviceAccounts: [app]\n    identity: {{local: {{path: {}}}}}\n    objects: [token]\n",
            dir.join("secrets-b").display()
        ));
    }
    s
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let d = tmp.path().to_owned();
    std::fs::create_dir_all(d.join("secrets-a")).unwrap();
    std::fs::create_dir_all(d.join("secrets-b")).unwrap();
    std::fs::write(d.join("secrets-a/db"), A_DB).unwrap();
    std::fs::write(d.join("secrets-a/api-key"), A_KEY).unwrap();
    std::fs::write(d.join("secrets-b/token"), B_TOKEN).unwrap();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    std::fs::write(d.join("etc/bindings.yaml"), bindings_yaml(&d, true)).unwrap();
    (tmp, d)
}

const A_OBJECTS: &str =
    "- objectName: db-password\n  object: db\n  key: password\n- objectName: api-key\n";
const B_OBJECTS: &str = "- objectName: token\n";

fn cat_as_nobody(path: &Path) -> Result<String, String> {
    let (ok, out, err) = run_as(NOBODY, NOBODY, "cat", &[path.to_str().unwrap()]);
    if ok { Ok(out) } else { Err(err) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_read_only_what_their_bindings_allow() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let mut node = client(&d).await;

    let a = Pod::new("team-a", "api", 1);
    let b = Pod::new("team-b", "app", 2);
    node.node_publish_volume(a.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    node.node_publish_volume(b.request(&root, B_OBJECTS, "tmpfs", None))
        .await
        .unwrap();
    // Each pod's files, read by another process as an unprivileged uid.
    assert_eq!(
        cat_as_nobody(&a.target(&root).join("db-password")).unwrap(),
        "S3cret-team-a-db-9e1"
    );
    assert_eq!(
        cat_as_nobody(&a.target(&root).join("api-key")).unwrap(),
        A_KEY
    );
    assert_eq!(
        cat_as_nobody(&b.target(&root).join("token")).unwrap(),
        B_TOKEN
    );

    // Pod B asks for team A's object: refused before anything is mounted, and audited.
    let b2 = Pod::new("team-b", "app", 3);
    let err = node
        .node_publish_volume(b2.request(&root, "- objectName: db\n", "fuse", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("team-b") && err.message().contains("\"db\""),
        "{}",
        err.message()
    );
    assert!(!is_mount_point(&b2.target(&root)));
    // Asking for team A's identity parameters does not help: bindings decide.
    let err = node
        .node_publish_volume(b2.request(
            &root,
            "- objectName: db\n  object: ../secrets-a/db\n",
            "fuse",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A token whose claims name another pod is refused.
    let a3 = Pod::new("team-a", "api", 4);
    let err = node
        .node_publish_volume(a3.request(&root, A_OBJECTS, "fuse", Some(&a)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("pod uid"), "{}", err.message());
    assert!(!is_mount_point(&a3.target(&root)));

    // A Vault volume whose pod has no token for Vault's audience (a CSIDriver without that
    // tokenRequest) gets a clear error before any Vault call.
    let v = Pod::new("team-v", "app", 5);
    let mut req = v.request(
        &root,
        "- objectName: db\n  secretPath: secret/data/db\n",
        "fuse",
        None,
    );
    req.volume_context.insert("provider".into(), "vault".into());
    req.volume_context.insert("roleName".into(), "app".into());
    let err = node.node_publish_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("kubelet sent no service-account token for audience \"vault\""),
        "{}",
        err.message()
    );
    assert!(!is_mount_point(&v.target(&root)));

    // Republish with a fresh token: cheap and the mount keeps working.
    let before = d.metric("keybroker_provider_fetches_total");
    node.node_publish_volume(a.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    assert_eq!(d.metric("keybroker_republishes_total"), 1);
    assert_eq!(
        d.metric("keybroker_provider_fetches_total"),
        before,
        "a republish fetched"
    );
    assert_eq!(
        cat_as_nobody(&a.target(&root).join("api-key")).unwrap(),
        A_KEY
    );
    // Republish with different attributes at the same target is a different volume.
    let err = node
        .node_publish_volume(a.request(&root, B_OBJECTS, "fuse", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Rotation reaches the pod's mount within the poll interval.
    write_atomic(
        &root.join("secrets-a/api-key"),
        "S3cret-team-a-api-key-ROTATED",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_file(&a.target(&root).join("api-key")).unwrap() != "S3cret-team-a-api-key-ROTATED" {
        assert!(Instant::now() < deadline, "rotation not visible");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert!(d.metric("keybroker_rotations_total") >= 1);

    // A mount that vanished under a live volume is noticed on republish and replaced.
    nix::mount::umount2(&a.target(&root), nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!is_mount_point(&a.target(&root)));
    node.node_publish_volume(a.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    assert_eq!(
        read_file(&a.target(&root).join("api-key")).unwrap(),
        "S3cret-team-a-api-key-ROTATED"
    );
    assert_eq!(d.metric("keybroker_repairs_total"), 1);
    assert!(d.logs().contains("remounted"), "{}", d.logs());

    // Unpublish removes everything; repeating it, or unpublishing an unknown target, succeeds.
    for p in [&a, &b] {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
        assert!(!is_mount_point(&p.target(&root)));
        assert!(!p.target(&root).exists(), "target directory left behind");
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
    }
    node.node_unpublish_volume(Pod::new("team-z", "x", 99).unpublish(&root))
        .await
        .unwrap();
    assert_eq!(d.metric("keybroker_volumes"), 0);
    assert!(d.metric("keybroker_denials_total") >= 3);

    let mut d = d;
    d.stop();
    let audit = root.join("audit.jsonl");
    let recs = audit_records(&audit);
    let deny = recs
        .iter()
        .find(|r| r["event"] == "deny" && r["pod"]["namespace"] == "team-b")
        .expect("deny record");
    assert_eq!(deny["outcome"], "denied");
    assert_eq!(deny["pod"]["service_account"], "app");
    assert!(
        recs.iter()
            .any(|r| r["event"] == "mount" && r["pod"]["name"] == "api-1")
    );
    assert!(
        recs.iter()
            .any(|r| r["event"] == "unmount" && r["pod"]["name"] == "api-1")
    );
    assert!(
        recs.iter()
            .any(|r| r["event"] == "read" && r["process"]["uid"] == NOBODY)
    );
    assert!(
        recs.iter()
            .any(|r| r["event"] == "rotate" && r["file"] == "api-key")
    );
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // No secret, and no token, in the audit log or the daemon's logs.
    let token = sa_token("team-a", "api", &a.name, &a.uid);
    let jwt_payload = token.split('.').nth(1).unwrap().to_owned();
    assert_no_secrets(
        &[
            "S3cret-team-a-db-9e1",
            A_KEY,
            "S3cret-team-a-api-key-ROTATED",
            B_TOKEN,
            &jwt_payload,
        ],
        &[&audit, &root.join("state")],
        &[("node logs", &d.logs())],
    );
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_volumes_publish_concurrently_and_leave_nothing_behind() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let node = client(&d).await;
    // Warm up: the first publish opens the binding's provider (an inotify watch), which stays
    // for as long as the daemon runs; the baseline is taken after it.
    let w = Pod::new("team-a", "api", 999);
    node.clone()
        .node_publish_volume(w.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    node.clone()
        .node_unpublish_volume(w.unpublish(&root))
        .await
        .unwrap();
    let (threads0, fds0) = (thread_count(d.pid()), fd_count(d.pid()));
    let pods: Vec<Pod> = (0..100)
        .map(|i| Pod::new("team-a", "api", 1000 + i))
        .collect();
    let mut tasks = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let mut n = node.clone();
        let req = p.request(
            &root,
            A_OBJECTS,
            if i % 2 == 0 { "fuse" } else { "tmpfs" },
            None,
        );
        tasks.push(tokio::spawn(
            async move { n.node_publish_volume(req).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for p in &pods {
        assert_eq!(read_file(&p.target(&root).join("api-key")).unwrap(), A_KEY);
    }
    assert_eq!(d.metric("keybroker_volumes"), 100);
    // 100 volumes of one identity sharing 2 objects: 2 provider fetches (+2 for the warm-up
    // volume, whose values were evicted when it went), not 200.
    assert_eq!(d.metric("keybroker_provider_fetches_total"), 4);

    let mut tasks = Vec::new();
    for p in &pods {
        let mut n = node.clone();
        let req = p.unpublish(&root);
        tasks.push(tokio::spawn(
            async move { n.node_unpublish_volume(req).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mi.contains(root.to_str().unwrap()), "mounts left behind");
    for p in &pods {
        assert!(!p.target(&root).exists());
    }
    assert_eq!(
        std::fs::read_dir(root.join("state/volumes"))
            .unwrap()
            .count(),
        0,
        "state records left behind"
    );
    // Threads and fds return to where they were (FUSE workers and /dev/fuse fds released).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (t, f) = (thread_count(d.pid()), fd_count(d.pid()));
        if t <= threads0 + 2 && f <= fds0 + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leak: threads {threads0} -> {t}, fds {fds0} -> {f}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_tmpfs_and_fuse_volumes_serving() {
    let (_tmp, root) = setup();
    let mut d = Daemon::start(&root);
    let mut node = client(&d).await;
    let t = Pod::new("team-a", "api", 7);
    let f = Pod::new("team-a", "api", 8);
    node.node_publish_volume(t.request(&root, A_OBJECTS, "tmpfs", None))
        .await
        .unwrap();
    node.node_publish_volume(f.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    drop(node);
    assert_eq!(
        d.keeper().ping().unwrap(),
        1,
        "the keeper holds the FUSE session"
    );
    d.kill9();
    // tmpfs content survives the daemon as files; the FUSE session survives in the keeper
    // (a reader would wait until the next process serves it).
    assert_eq!(read_file(&t.target(&root).join("api-key")).unwrap(), A_KEY);
    assert!(is_mount_point(&f.target(&root)), "the FUSE mount stays");

    let d = Daemon::start(&root);
    assert_eq!(d.metric("keybroker_volumes"), 2, "{}", d.logs());
    let logs = d.logs();
    assert!(
        logs.contains("tmpfs volume taken over after restart"),
        "{logs}"
    );
    assert!(
        logs.contains("FUSE session taken over after restart"),
        "{logs}"
    );
    assert!(
        !logs.contains("Containers that already had it mounted"),
        "{logs}"
    );
    assert_eq!(d.metric("keybroker_repairs_total"), 0);
    assert_eq!(read_file(&f.target(&root).join("api-key")).unwrap(), A_KEY);
    // Both taken-over volumes are refreshed again.
    write_atomic(&root.join("secrets-a/api-key"), "S3cret-after-restart");
    let deadline = Instant::now() + Duration::from_secs(120);
    for p in [&t, &f] {
        while read_file(&p.target(&root).join("api-key")).unwrap() != "S3cret-after-restart" {
            assert!(
                Instant::now() < deadline,
                "taken-over volume not refreshed:\n{}",
                d.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut node = client(&d).await;
    for p in [&t, &f] {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
        assert!(!is_mount_point(&p.target(&root)));
    }
    assert_eq!(
        d.keeper().ping().unwrap(),
        0,
        "unpublish closes the kept session"
    );
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mi.contains(root.to_str().unwrap()),
        "mounts left behind:\n{mi}"
    );
}

/// keybroker registers itself with kubelet (no node-driver-registrar): kubelet's plugin watcher
/// finds `csi.keybroker.io-reg.sock` in `plugins_registry`, `GetInfo` names the driver and its
/// CSI socket (which answers `NodeGetInfo`), and kubelet's verdict shows in `/readyz` and the
/// metrics. After an upgrade (a second process takes the volumes over through the handover)
/// the registration socket is the new process's, not removed by the old one on its way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_registers_itself_with_kubelet_and_keeps_it_across_an_upgrade() {
    use keybroker_csi::registration_pb::{self as rp, registration_client::RegistrationClient};
    let (_tmp, root) = setup();
    let registry = root.join("kubelet/plugins_registry");
    let reg = ["--kubelet-registration-dir", registry.to_str().unwrap()];
    let old = Daemon::start_opts(&root, "1s", &root.join("audit.jsonl"), &reg);
    let sock = registry.join("csi.keybroker.io-reg.sock");
    // kubelet's plugin watcher: the socket appears and answers GetInfo.
    let watcher = || async {
        wait_for("the registration socket", Duration::from_secs(120), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        let mut kubelet =
            RegistrationClient::new(keybroker_csi::connect_unix(&sock).await.unwrap());
        let info = kubelet
            .get_info(rp::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        (kubelet, info)
    };
    let (mut kubelet, info) = watcher().await;
    assert_eq!(
        (info.r#type.as_str(), info.name.as_str()),
        ("CSIPlugin", "csi.keybroker.io")
    );
    assert_eq!(info.supported_versions, ["1.0.0"]);
    assert_eq!(
        Path::new(&info.endpoint),
        old.sock,
        "the CSI socket kubelet will call"
    );
    // What kubelet does next: NodeGetInfo on that endpoint.
    let mut csi = keybroker_csi::pb::node_client::NodeClient::new(
        keybroker_csi::connect_unix(&info.endpoint).await.unwrap(),
    );
    let node_info = csi
        .node_get_info(keybroker_csi::pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "test-node");
    // kubelet refuses: not ready, and /readyz says why; then it registers.
    kubelet
        .notify_registration_status(rp::RegistrationStatus {
            plugin_registered: false,
            error: "RegisterPlugin error -- no handler registered for plugin type: CSIPlugin"
                .into(),
        })
        .await
        .unwrap();
    let readyz = old.http("/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    assert!(
        readyz.contains("kubelet refused the plugin registration: RegisterPlugin error"),
        "{readyz}"
    );
    assert!(
        old.logs()
            .contains("kubelet refused the plugin registration")
    );
    assert_eq!(old.metric("keybroker_kubelet_registered"), 0);
    kubelet
        .notify_registration_status(rp::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert!(old.http("/readyz").starts_with("HTTP/1.1 200"));
    assert_eq!(old.metric("keybroker_kubelet_registered"), 1);

    // An upgrade: the new process takes over through the handover, the old one exits.
    let new = Daemon::start_opts(&root, "1s", &root.join("audit.jsonl"), &reg);
    old.replaced();
    let (_, info) = watcher().await;
    assert_eq!(Path::new(&info.endpoint), new.sock);
    drop(new);
}

/// A keeper a node started by itself (`--fd-keeper auto`) outlives a crash while it holds
/// sessions, serves the next node, and exits with that node once it holds none: a node run by
/// hand or by a test harness leaves no keeper process behind (it used to linger 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_the_node_started_exits_with_its_node_once_it_holds_nothing() {
    let (_tmp, root) = setup();
    let mut d = Daemon::start(&root);
    let f = Pod::new("team-a", "api", 9);
    let mut node = client(&d).await;
    node.node_publish_volume(f.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    drop(node);
    let keeper = d.keeper();
    assert_eq!(keeper.ping().unwrap(), 1);
    d.kill9();
    // The node is gone but a session is held: the keeper stays, for the next node.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(keeper.ping().unwrap(), 1, "the keeper left with a session");
    let mut d = Daemon::start(&root);
    let mut node = client(&d).await;
    node.node_unpublish_volume(f.unpublish(&root))
        .await
        .unwrap();
    drop(node);
    // Empty, but its (new) node lives: it stays.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(keeper.ping().unwrap(), 0, "the keeper left its live node");
    d.stop();
    // Its node has exited and it holds nothing: it goes, well before its 60 s idle exit.
    let took = wait_for(
        "the keeper to exit with its node",
        Duration::from_secs(45),
        || keeper.ping().is_err(),
    );
    println!("keeper exited {took:?} after its node");
    assert!(
        !root.join("state/keeper.sock").exists(),
        "the keeper's socket is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_fd_keeper_a_restart_remounts_fuse_and_says_what_it_means() {
    let (_tmp, root) = setup();
    let no_keeper = ["--fd-keeper", "off"];
    let mut d = Daemon::start_opts(&root, "1s", &root.join("audit.jsonl"), &no_keeper);
    let mut node = client(&d).await;
    let f = Pod::new("team-a", "api", 8);
    node.node_publish_volume(f.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    drop(node);
    // A FUSE session no keeper holds: not ready, and /readyz says why.
    let not_ready = |d: &Daemon| {
        let page = d.http("/readyz");
        page.starts_with("HTTP/1.1 503")
            && page.contains("1 FUSE sessions are not held by an fd keeper")
            && page.contains("--fd-keeper off")
    };
    assert!(not_ready(&d), "{}", d.http("/readyz"));
    assert_eq!(d.metric("keybroker_fuse_sessions_unkept"), 1);
    d.kill9();
    assert_eq!(
        std::fs::read_dir(f.target(&root))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTCONN)
    );
    let d = Daemon::spawn_env(
        &root,
        "1s",
        &root.join("audit.jsonl"),
        &no_keeper,
        &[],
        false,
    );
    wait_for(
        "/readyz 503 naming the unkept session",
        Duration::from_secs(120),
        || not_ready(&d),
    );
    assert!(
        d.logs().contains("Containers that already had it mounted"),
        "{}",
        d.logs()
    );
    assert_eq!(d.metric("keybroker_repairs_total"), 1);
    assert_eq!(
        read_file(&f.target(&root).join("api-key")).unwrap(),
        A_KEY,
        "FUSE volume remounted"
    );
    let mut node = client(&d).await;
    node.node_unpublish_volume(f.unpublish(&root))
        .await
        .unwrap();
    assert!(!is_mount_point(&f.target(&root)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_reload_and_a_bad_file_keeps_the_previous_ones() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let mut node = client(&d).await;
    let b = Pod::new("team-b", "app", 20);
    // Remove team B's binding: its next publish is denied.
    write_atomic(
        &root.join("etc/bindings.yaml"),
        &bindings_yaml(&root, false),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match node
            .node_publish_volume(b.request(&root, B_OBJECTS, "fuse", None))
            .await
        {
            Err(e) if e.code() == Code::PermissionDenied => break,
            Ok(_) => {
                node.node_unpublish_volume(b.unpublish(&root))
                    .await
                    .unwrap();
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file is refused; the previous bindings stay in force.
    write_atomic(
        &root.join("etc/bindings.yaml"),
        "bindings:\n  - name: [broken\n",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.metric("keybroker_bindings_reload_errors_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "bad file not noticed:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.logs().contains("keeping the previous bindings"));
    let a = Pod::new("team-a", "api", 21);
    node.node_publish_volume(a.request(&root, A_OBJECTS, "fuse", None))
        .await
        .unwrap();
    node.node_unpublish_volume(a.unpublish(&root))
        .await
        .unwrap();

    // `keybroker check` explains decisions offline.
    let bindings = root.join("bindings-check.yaml");
    std::fs::write(&bindings, bindings_yaml(&root, true)).unwrap();
    let check = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("check")
            .arg("--bindings")
            .arg(&bindings)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = check(&[
        "--namespace",
        "team-a",
        "--service-account",
        "api",
        "--provider",
        "local",
        "--object",
        "db",
    ]);
    assert!(ok && out.contains("team-a-dev"), "{out}");
    let (ok, out) = check(&[
        "--namespace",
        "team-b",
        "--service-account",
        "app",
        "--provider",
        "local",
        "--object",
        "db",
    ]);
    assert!(
        !ok && out.contains("does not grant objects [\"db\"]"),
        "{out}"
    );
    let (ok, out) = check(&[]);
    assert!(
        ok && out.contains("3 bindings") && out.contains("objects [db, api-key]"),
        "{out}"
    );
    std::fs::write(&bindings, "bindings: [{name: x}]\n").unwrap();
    let (ok, out) = check(&[]);
    assert!(!ok && out.contains("invalid"), "{out}");
}
