//! `keybroker node` attacked the way a hostile pod author and a bad day at the node would:
//! template bombs, nesting bombs and huge attributes, kill -9 in the middle of publishes, a
//! full audit disk, edited audit logs, odd targets, and mounts held by other namespaces. Every
//! test drives the built binary over its CSI socket as kubelet does.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::node::*;
use common::*;
use tonic::Code;

const DB: &str = r#"{"username":"app","password":"S3cret-hardening-db-41"}"#;

fn setup() -> (tempfile::TempDir, PathBuf) {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let d = tmp.path().to_owned();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/db"), DB).unwrap();
    // One object just under the 1 MiB object limit, as a JSON map: the template bomb's fuel.
    let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(1000 << 10));
    std::fs::write(d.join("secrets/big"), big).unwrap();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    std::fs::write(
        d.join("etc/bindings.yaml"),
        format!(
            "bindings:\n  - name: apps\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {{local: {{path: {0}}}}}\n    objects: [db, big]\n  - name: hostile\n    namespace: team-h\n    serviceAccounts: [evil]\n    identity: {{local: {{path: {0}}}}}\n    objects: [db, big]\n",
            d.join("secrets").display()
        ),
    )
    .unwrap();
    (tmp, d)
}

const DB_OBJECTS: &str = "- objectName: password\n  object: db\n  key: password\n";

fn status_of(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The hostile inputs of the adversarial report, as volume attributes.
fn hostile_objects() -> Vec<(&'static str, String)> {
    let nest = 60_000;
    vec![
        (
            "deep flow nesting in filePermission",
            format!(
                "- objectName: big\n  filePermission: {}{}\n",
                "[".repeat(nest),
                "]".repeat(nest)
            ),
        ),
        (
            "deep compact sequences",
            format!(
                "- objectName: big\n  secretArgs:\n    {}x\n",
                "- ".repeat(nest)
            ),
        ),
        (
            "template bomb",
            format!(
                "- objectName: f\n  object: big\n  template: \"{}\"\n",
                "{{k}}".repeat(4000)
            ),
        ),
        (
            "template bomb across files",
            (0..8)
                .map(|i| {
                    format!(
                        "- objectName: f{i}\n  object: big\n  template: \"{}\"\n",
                        "{{k}}".repeat(500)
                    )
                })
                .collect(),
        ),
        (
            "huge attributes",
            format!("# {}\n- objectName: db\n", "y".repeat(300 << 10)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_publishes_cannot_stall_or_crash_the_node() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let pid = d.pid();
    let inputs = hostile_objects();
    // Eight hostile publishes at once, from pods of one namespace.
    let mut hostile = Vec::new();
    for i in 0..8 {
        let (what, objects) = inputs[i % inputs.len()].clone();
        let pod = Pod::new("team-h", "evil", 100 + i);
        let req = pod.request(&root, &objects, "fuse", None);
        let mut node = client(&d).await;
        hostile.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = node.node_publish_volume(req).await;
            (what, res.map(|_| ()), started.elapsed())
        }));
    }
    // Meanwhile an ordinary pod publishes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ok_pod = Pod::new("team-a", "api", 1);
    let mut node = client(&d).await;
    let started = Instant::now();
    node.node_publish_volume(ok_pod.request(&root, DB_OBJECTS, "fuse", None))
        .await
        .unwrap();
    let ordinary = started.elapsed();
    for h in hostile {
        let (what, res, took) = h.await.unwrap();
        let e = res.expect_err(what);
        println!("{what}: {:?} in {took:?}: {}", e.code(), e.message());
        match what {
            w if w.starts_with("deep") => {
                assert_eq!(e.code(), Code::InvalidArgument, "{what}");
                assert!(
                    e.message().starts_with("objects[0]"),
                    "{what}: {}",
                    e.message()
                );
                assert!(e.message().contains("nested more than"), "{}", e.message());
            }
            w if w.starts_with("template") => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{what}");
                assert!(
                    e.message().contains("renders to more than")
                        || e.message().contains("maxVolumeBytes"),
                    "{}",
                    e.message()
                );
            }
            _ => assert_eq!(e.code(), Code::InvalidArgument, "{what}"),
        }
    }
    let peak_kib = status_of(pid, "VmHWM:");
    println!(
        "ordinary publish beside 8 hostile ones: {ordinary:?}; node peak RSS {} MiB",
        peak_kib / 1024
    );
    // The report saw 47 s and a 2 GB abort; measured figures are in BENCHMARKS.md.
    assert!(ordinary < Duration::from_secs(5), "{ordinary:?}");
    assert!(peak_kib < 100 * 1024, "peak RSS {peak_kib} KiB");
    assert_eq!(
        read_file(&ok_pod.target(&root).join("password")).unwrap(),
        "S3cret-hardening-db-41"
    );
    // Still alive and serving.
    assert!(d.http("/healthz").starts_with("HTTP/1.1 200"));
    node.node_unpublish_volume(ok_pod.unpublish(&root))
        .await
        .unwrap();
    // Nothing of a hostile publish stays behind.
    for i in 0..8 {
        let t = Pod::new("team-h", "evil", 100 + i).target(&root);
        assert!(!is_mount_point(&t), "{}", t.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_text_never_reaches_errors_logs_or_the_audit_log() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let mut node = client(&d).await;
    let planted = "PLANTED-POD-TEXT-7731";
    let cases = [
        format!("- objectName: db\n  filePermission: \"{planted}\"\n"),
        format!("- objectName: db\n  filePermission: [\"{planted}\"]\n"),
        format!("- objectName: db\n  {planted}: 1\n"),
        format!("- objectName: db\n  encoding: \"{planted}\"\n"),
        format!("- objectName: \"{planted}/../x\"\n"),
        format!("objectName: {planted}\n"),
    ];
    for (i, objects) in cases.iter().enumerate() {
        let pod = Pod::new("team-a", "api", 10 + i);
        let e = node
            .node_publish_volume(pod.request(&root, objects, "fuse", None))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{objects}: {}",
            e.message()
        );
        assert!(e.message().contains("objects"), "{}", e.message());
        assert!(!e.message().contains(planted), "{}", e.message());
    }
    let mut d = d;
    d.stop();
    let audit = std::fs::read_to_string(root.join("audit.jsonl")).unwrap();
    assert!(audit.contains("filePermission"), "the field is named");
    assert_no_secrets(
        &[planted],
        &[&root.join("state")],
        &[("node log", &d.logs()), ("audit log", &audit)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_must_be_empty_directories_outside_kernel_filesystems() {
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let mut node = client(&d).await;

    // The final component is a symlink: refused, nothing mounted at its destination.
    let p = Pod::new("team-a", "api", 20);
    let t = p.target(&root);
    std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &t).unwrap();
    let e = node
        .node_publish_volume(p.request(&root, DB_OBJECTS, "tmpfs", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("symlink") && e.message().contains(t.to_str().unwrap()));
    assert!(!is_mount_point(&elsewhere));

    // A non-empty directory is not mounted over.
    let p = Pod::new("team-a", "api", 21);
    let t = p.target(&root);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("keep-me"), "x").unwrap();
    let e = node
        .node_publish_volume(p.request(&root, DB_OBJECTS, "fuse", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not an empty directory"),
        "{}",
        e.message()
    );
    assert!(!is_mount_point(&t));

    // Kernel filesystems are refused before anything is looked at.
    let p = Pod::new("team-a", "api", 22);
    let mut req = p.request(&root, DB_OBJECTS, "fuse", None);
    req.target_path = format!("/proc/{}/fdinfo", std::process::id());
    let e = node.node_publish_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("/proc"), "{}", e.message());
}

/// The storm of the adversarial report: 100 volumes publishing, kill -9 at 0.3 s, restart,
/// kubelet's retries, then unpublish everything. Three rounds in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_publish_storm_leaves_nothing_broken_or_behind() {
    let (_tmp, root) = setup();
    for round in 0..3 {
        let mut d = Daemon::start(&root);
        let pods: Vec<Pod> = (0..100)
            .map(|i| Pod::new("team-a", "api", 1000 + i))
            .collect();
        let kind = |i: usize| if i.is_multiple_of(2) { "fuse" } else { "tmpfs" };
        let mut inflight = Vec::new();
        for (i, p) in pods.iter().enumerate() {
            let req = p.request(&root, DB_OBJECTS, kind(i), None);
            let mut node = client(&d).await;
            inflight.push(tokio::spawn(
                async move { node.node_publish_volume(req).await },
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.kill9();
        let mut done_before = 0;
        for h in inflight {
            if matches!(h.await, Ok(Ok(_))) {
                done_before += 1;
            }
        }
        let d = Daemon::start(&root);
        let mut node = client(&d).await;
        // kubelet retries every publish it has not seen succeed, and republishes the rest.
        let mut failed = Vec::new();
        for (i, p) in pods.iter().enumerate() {
            if let Err(e) = node
                .node_publish_volume(p.request(&root, DB_OBJECTS, kind(i), None))
                .await
            {
                failed.push(format!("{}: {:?} {}", p.name, e.code(), e.message()));
            }
        }
        assert!(
            failed.is_empty(),
            "round {round}: {} of 100 retries failed:\n{}\n{}",
            failed.len(),
            failed.join("\n"),
            d.logs()
        );
        for (i, p) in pods.iter().enumerate() {
            let t = p.target(&root);
            let read = read_file(&t.join("password")).unwrap_or_else(|e| {
                panic!(
                    "round {round}: {} ({} volume): {e}; target a mount point: {}, holds {:?}\n{}",
                    p.name,
                    kind(i),
                    is_mount_point(&t),
                    std::fs::read_dir(&t)
                        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                        .unwrap_or_default(),
                    d.logs()
                )
            });
            assert_eq!(read, "S3cret-hardening-db-41", "{}", p.name);
        }
        for p in &pods {
            node.node_unpublish_volume(p.unpublish(&root))
                .await
                .unwrap();
        }
        let left = mounts_under(&root);
        println!(
            "round {round}: {done_before} publishes done before the kill, 0 failed retries, {} mounts left",
            left.len()
        );
        assert!(left.is_empty(), "round {round}: mounts left: {left:?}");
        for p in &pods {
            assert!(!p.target(&root).exists(), "target left: {}", p.name);
            let staging = keybroker::volume::mountpoint::staging_dir(
                &root.join("state/staging"),
                &p.target(&root),
            );
            assert!(!is_mount_point(&staging), "staging tmpfs left: {}", p.name);
        }
        assert!(
            std::fs::read_dir(root.join("state/volumes"))
                .unwrap()
                .next()
                .is_none(),
            "records left"
        );
        let mut d = d;
        d.stop();
    }
}

fn mounts_under(root: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(root))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_stops_serving_while_the_audit_log_is_full_and_recovers_after() {
    let (_tmp, root) = setup();
    let fs = SmallFs::new(&root.join("auditfs"), 512);
    let closed_dir = root.join("closed");
    let open_dir = root.join("open");
    for dir in [&closed_dir, &open_dir] {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::copy(
            root.join("etc/bindings.yaml"),
            dir.join("etc/bindings.yaml"),
        )
        .unwrap();
    }
    let closed = Daemon::start_opts(
        &closed_dir,
        "1s",
        &fs.0.join("closed.jsonl"),
        &["--audit-fail-closed"],
    );
    let open = Daemon::start_opts(&open_dir, "1s", &fs.0.join("open.jsonl"), &[]);
    let a = Pod::new("team-a", "api", 30);
    let b = Pod::new("team-a", "api", 31);
    let mut cn = client(&closed).await;
    let mut on = client(&open).await;
    cn.node_publish_volume(a.request(&closed_dir, DB_OBJECTS, "fuse", None))
        .await
        .unwrap();
    on.node_publish_volume(b.request(&open_dir, DB_OBJECTS, "fuse", None))
        .await
        .unwrap();
    let file = a.target(&closed_dir).join("password");
    assert_eq!(read_file(&file).unwrap(), "S3cret-hardening-db-41");

    fs.fill();
    // The next audited open is the write that fails; after it, opens get EIO.
    wait_for(
        "fail-closed opens to fail",
        Duration::from_secs(120),
        || read_file(&file).is_err_and(|e| e.raw_os_error() == Some(libc::EIO)),
    );
    let _ = read_file(&b.target(&open_dir).join("password")).unwrap();
    for d in [&closed, &open] {
        wait_for("not ready", Duration::from_secs(120), || {
            d.http("/readyz").starts_with("HTTP/1.1 503")
        });
        assert_eq!(d.metric("keybroker_audit_healthy"), 0);
        assert!(d.metric("keybroker_audit_write_errors_total") > 0);
    }
    // A new publish is refused while the log cannot be written, and says why.
    let c = Pod::new("team-a", "api", 32);
    let e = cn
        .node_publish_volume(c.request(&closed_dir, DB_OBJECTS, "fuse", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains("audit log cannot be written"),
        "{}",
        e.message()
    );
    // Without fail-closed, reads go on.
    assert_eq!(
        read_file(&b.target(&open_dir).join("password")).unwrap(),
        "S3cret-hardening-db-41"
    );

    fs.unfill();
    wait_for("opens served again", Duration::from_secs(120), || {
        read_file(&file).is_ok()
    });
    for d in [&closed, &open] {
        wait_for("ready again", Duration::from_secs(120), || {
            d.http("/readyz").starts_with("HTTP/1.1 200")
        });
        assert_eq!(d.metric("keybroker_audit_healthy"), 1);
    }
    cn.node_publish_volume(c.request(&closed_dir, DB_OBJECTS, "fuse", None))
        .await
        .unwrap();
    for p in [&a, &c] {
        cn.node_unpublish_volume(p.unpublish(&closed_dir))
            .await
            .unwrap();
    }
    on.node_unpublish_volume(b.unpublish(&open_dir))
        .await
        .unwrap();
    let (mut closed, mut open) = (closed, open);
    closed.stop();
    open.stop();
    // Nothing half-written stayed in the logs: both chains verify.
    for log in ["closed.jsonl", "open.jsonl"] {
        let out = Command::new(BIN)
            .args(["audit", "verify"])
            .arg(fs.0.join(log))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{log}: {text}");
    }
}

fn verify(log: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(log)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_audit_log_resists_truncation_forgery_and_torn_tails() {
    let (_tmp, root) = setup();
    let key = root.join("audit.key");
    std::fs::write(&key, hex::encode([0x5au8; 32])).unwrap();
    let key_arg = key.to_str().unwrap().to_owned();
    let log = root.join("audit.jsonl");
    let head = PathBuf::from(format!("{}.head", log.display()));
    let mut d = Daemon::start_opts(&root, "1s", &log, &["--audit-key", &key_arg]);
    let mut node = client(&d).await;
    for i in 0..3 {
        let p = Pod::new("team-a", "api", 40 + i);
        node.node_publish_volume(p.request(&root, DB_OBJECTS, "tmpfs", None))
            .await
            .unwrap();
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
    }
    d.stop();
    let (ok, out) = verify(&log, &["--key", &key_arg]);
    assert!(ok && out.contains("HMAC chain intact"), "{out}");
    let (ok, out) = verify(&log, &[]);
    assert!(!ok && out.contains("--key"), "{out}");

    let original = std::fs::read(&log).unwrap();
    let original_head = std::fs::read(&head).unwrap();
    // Cut three records and delete the anchor: found, unless the auditor says otherwise.
    let lines: Vec<&[u8]> = original.split_inclusive(|b| *b == b'\n').collect();
    std::fs::write(&log, lines[..lines.len() - 3].concat()).unwrap();
    std::fs::remove_file(&head).unwrap();
    let (ok, out) = verify(&log, &["--key", &key_arg]);
    assert!(!ok && out.contains("head anchor"), "{out}");
    let (ok, _) = verify(&log, &["--key", &key_arg, "--allow-missing-head"]);
    assert!(ok);
    // One appended record, correctly chained with SHA-256 (all a forger without the key has).
    std::fs::write(&head, &original_head).unwrap();
    let last = lines.last().unwrap();
    let prev = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        &last[..last.len() - 1],
    ));
    let forged = format!(
        "{{\"seq\":{},\"time\":\"2026-12-01T00:00:00Z\",\"event\":\"read\",\"outcome\":\"success\",\"prev\":\"{prev}\"}}\n",
        lines.len()
    );
    std::fs::write(&log, [original.as_slice(), forged.as_bytes()].concat()).unwrap();
    let (ok, out) = verify(&log, &["--key", &key_arg]);
    assert!(
        !ok && out.contains(&format!("line {}", lines.len() + 1)),
        "{out}"
    );

    // A torn last line, then a restart: the tear is cut, recorded, and the sequence goes on.
    std::fs::write(
        &log,
        [original.as_slice(), b"{\"seq\":99,\"ti".as_slice()].concat(),
    )
    .unwrap();
    let mut d = Daemon::start_opts(&root, "1s", &log, &["--audit-key", &key_arg]);
    d.stop();
    let (ok, out) = verify(&log, &["--key", &key_arg]);
    assert!(ok, "{out}");
    let recs = audit_records(&log);
    let tear = &recs[lines.len()];
    assert_eq!(tear["seq"], lines.len() as u64);
    assert!(
        tear["detail"].as_str().unwrap().contains("13 bytes"),
        "{tear}"
    );
}

#[test]
fn no_keybroker_process_can_dump_core() {
    require_root_and_fuse();
    // A long-lived keybroker as an ordinary user: `audit verify` reading from a FIFO.
    let dir = open_tempdir();
    let fifo = dir.path().join("log");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o666)).unwrap();
    use std::os::unix::process::CommandExt;
    let child = Command::new(BIN)
        .args(["audit", "verify", "--allow-missing-head"])
        .arg(&fifo)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // However this test ends, the blocked child goes with it.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(child);
    let limits = || std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    // Blocked opening the FIFO: past start-up, where the limits are set.
    wait_for(
        "the process to block on the FIFO",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| {
                ["fifo", "pipe", "wait_for_partner"]
                    .iter()
                    .any(|x| w.contains(x))
            })
        },
    );
    let core = limits()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(core, "0 0", "RLIMIT_CORE soft and hard");
    // Not dumpable: the kernel hands /proc/<pid> to root instead of the process's own uid.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid} of a uid-65534 process is owned by root"
    );
    // Unblock and end it.
    let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
    wait_timeout(&mut child.0, Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_returns_while_another_mount_namespace_holds_the_volume() {
    let (_tmp, root) = setup();
    let mut d = Daemon::start_opts(
        &root,
        "1s",
        &root.join("audit.jsonl"),
        &["--fuse-linger", "3s"],
    );
    let mut node = client(&d).await;
    // A container's view: another mount namespace with the volume bound at its own path.
    // (Removing the target directory detaches copies *at the target* in other namespaces; a
    // bind elsewhere, as a container runtime makes, stays.)
    let run_holder = |target: &Path, hold: &Path| {
        std::fs::create_dir_all(hold).unwrap();
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {t} {h} && cat {h}/password >/dev/null && echo held && exec sleep 60",
                t = target.display(),
                h = hold.display()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        child
    };
    // One volume whose holder goes away, one whose holder outstays --fuse-linger.
    let p1 = Pod::new("team-a", "api", 50);
    let p2 = Pod::new("team-a", "api", 51);
    for p in [&p1, &p2] {
        node.node_publish_volume(p.request(&root, DB_OBJECTS, "fuse", None))
            .await
            .unwrap();
    }
    let (hold1, hold2) = (root.join("hold1"), root.join("hold2"));
    let mut h1 = run_holder(&p1.target(&root), &hold1);
    let mut h2 = run_holder(&p2.target(&root), &hold2);
    for p in [&p1, &p2] {
        let started = Instant::now();
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
        let took = started.elapsed();
        println!("unpublish with another namespace holding the volume: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(!is_mount_point(&p.target(&root)));
    }
    // The other namespace still reads its copy.
    let read_in = |h: &std::process::Child, hold: &Path| {
        Command::new("nsenter")
            .args(["-t", &h.id().to_string(), "-m", "cat"])
            .arg(hold.join("password"))
            .output()
            .unwrap()
    };
    for (h, hold) in [(&h1, &hold1), (&h2, &hold2)] {
        let out = read_in(h, hold);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "S3cret-hardening-db-41",
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
    }
    assert_eq!(
        d.metric("keybroker_fuse_sessions_lingering"),
        2,
        "{}\n{}",
        d.logs(),
        std::fs::read_to_string(root.join("audit.jsonl")).unwrap_or_default()
    );
    let _ = h1.kill();
    let _ = h1.wait();
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.metric("keybroker_fuse_sessions_lingering") != 0 {
        assert!(
            Instant::now() < deadline,
            "sessions did not end:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The second outstayed --fuse-linger: its connection was aborted.
    let after = read_in(&h2, &hold2);
    assert!(
        !after.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&after.stdout),
        d.logs()
    );
    let _ = h2.kill();
    let _ = h2.wait();
    d.stop();
    let audit = std::fs::read_to_string(root.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("another mount namespace still holds"),
        "{audit}"
    );
    assert!(audit.contains("session ended"), "{audit}");
    assert!(
        audit.contains("connection aborted") || audit.contains("cannot abort"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioctl_is_answered_quietly_and_port_0_logs_the_bound_port() {
    let (_tmp, root) = setup();
    let mut d = Daemon::start(&root);
    let mut node = client(&d).await;
    let p = Pod::new("team-a", "api", 60);
    node.node_publish_volume(p.request(&root, DB_OBJECTS, "fuse", None))
        .await
        .unwrap();
    // Python's text-mode open asks TCGETS (ioctl 21505) on every open.
    let out = common::output_ok(Command::new("python3").arg("-c").arg(format!(
        "print(open('{}/password').read())",
        p.target(&root).display()
    )));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "S3cret-hardening-db-41"
    );
    node.node_unpublish_volume(p.unpublish(&root))
        .await
        .unwrap();
    d.stop();
    assert!(!d.logs().contains("Not Implemented"), "{}", d.logs());

    // --metrics-addr with port 0 logs the port it got.
    let log = root.join("port0.log");
    let mut child = Command::new(BIN)
        .args(["node", "--node-id", "n", "--metrics-addr", "127.0.0.1:0"])
        // No FUSE volume here: no fd keeper to leave behind.
        .args(["--fd-keeper", "off"])
        .arg("--endpoint")
        .arg(format!("unix://{}", root.join("csi0/csi.sock").display()))
        .arg("--bindings")
        .arg(root.join("etc/bindings.yaml"))
        .arg("--state-dir")
        .arg(root.join("state0"))
        .arg("--audit-log")
        .arg(root.join("audit0.jsonl"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("serving", Duration::from_secs(120), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("serving CSI"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = text.lines().find(|l| l.contains("serving CSI")).unwrap();
    assert!(
        line.contains("127.0.0.1:") && !line.contains("127.0.0.1:0 "),
        "{line}"
    );
    assert!(!line.ends_with("127.0.0.1:0"), "{line}");
}

/// grpc-core (here grpc-python) sends the percent-encoded socket path as `:authority`
/// (`%2F...%2Fcsi.sock`), as grpc-go does for kubelet's passthrough dial; the HTTP/2 server
/// under tonic refuses that with PROTOCOL_ERROR unless keybroker repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_core_clients_with_a_percent_encoded_authority_are_served() {
    use prost::Message;
    let (_tmp, root) = setup();
    let d = Daemon::start(&root);
    let p = Pod::new("team-a", "api", 70);
    let publish = hex::encode(p.request(&root, DB_OBJECTS, "fuse", None).encode_to_vec());
    let unpublish = hex::encode(p.unpublish(&root).encode_to_vec());
    // Raw protobuf bytes in and out, so the client needs no generated code: the encoding is
    // prost's, the HTTP/2 and gRPC framing grpc-core's.
    let script = r#"
import sys, grpc
sock, publish, unpublish = sys.argv[1:4]
ch = grpc.insecure_channel("unix://" + sock)
def call(method, body):
    f = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        return "ok " + f(bytes.fromhex(body), timeout=20).hex()
    except grpc.RpcError as e:
        return "error %s %s" % (e.code(), e.details())
print(call("/csi.v1.Identity/GetPluginInfo", ""))
print(call("/csi.v1.Node/NodePublishVolume", publish))
print(open(sys.argv[4]).read())
print(call("/csi.v1.Node/NodeUnpublishVolume", unpublish))
"#;
    let target = p.target(&root).join("password");
    let out = Command::new(common::peers::peers_python())
        .arg("-c")
        .arg(script)
        .arg(&d.sock)
        .arg(&publish)
        .arg(&unpublish)
        .arg(&target)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let info = lines[0]
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("{stdout}"));
    let info =
        keybroker_csi::pb::GetPluginInfoResponse::decode(&*hex::decode(info).unwrap()).unwrap();
    assert_eq!(info.name, keybroker_csi::DRIVER_NAME);
    assert!(lines[1].starts_with("ok"), "publish: {stdout}");
    assert_eq!(lines[2], "S3cret-hardening-db-41");
    assert!(lines[3].starts_with("ok"), "unpublish: {stdout}");
    assert!(!is_mount_point(&p.target(&root)));
}
