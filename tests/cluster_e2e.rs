//! keybroker in a real single-node Kubernetes cluster (`scripts/cluster.sh`: kube-apiserver,
//! kubelet, controller-manager and scheduler v1.35.4 built from the Go module, Debian's etcd,
//! containerd and runc, in a network namespace of its own). The Helm chart is installed with
//! the image `scripts/build-image.sh` built, and kubelet itself calls keybroker: registration
//! through `plugins_registry`, NodePublishVolume with its own pod info and the apiserver's
//! tokens, NodeUnpublishVolume at pod deletion. A reader pod reads a tmpfs and a FUSE volume
//! every 10 ms while keybroker is upgraded, its pod deleted and its process killed; not one
//! read may fail, and the driver must stay in CSINode throughout.
//!
//! One test function: there is one cluster on the machine at a time. It is brought up here and
//! torn down when the test ends, however it ends.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;

const SECRET: &str = "S3cret-cluster-db-4242";
const SECRET_V2: &str = "S3cret-cluster-db-v2";
/// The state directory on the node: on a shared mount (its tmpfs staging mounts propagate to
/// the host), which kubelet's directory is; it goes with the cluster.
const STATE_DIR: &str = "/var/lib/kubelet/keybroker-state";

/// The reader: reads both volumes every 10 ms with the shell's own `read` (no process per
/// read), and logs an `ERR` line for a failed or wrong read (lengths only, never the value), a
/// `SLOW <end µs> <interval µs>` line when two reads are more than 100 ms apart, and a
/// `N <µs> <count>` line every 500 rounds. The times are the node's clock (the pod's too).
const READER: &str = r#"n=0; last=${EPOCHREALTIME/./}
while :; do
  a=; b=
  read -r a < /t/password
  read -r b < /f/password
  now=${EPOCHREALTIME/./}
  case "$a" in S3cret*) ;; *) echo "ERR $now tmpfs ${#a}";; esac
  case "$b" in S3cret*) ;; *) echo "ERR $now fuse ${#b}";; esac
  gap=$((now - last))
  if [ $gap -gt 100000 ]; then echo "SLOW $now $gap"; fi
  last=$now; n=$((n + 1))
  if [ $((n % 500)) -eq 0 ]; then echo "N $now $n"; fi
  usleep 10000
done
"#;

const PASSWORD: &str = "- objectName: password\n  object: db\n  filePermission: \"0440\"\n";

/// What `cat PATH` prints in the pod's app container (and whether it succeeded).
fn read_in(ns: &str, pod: &str, path: &str) -> (bool, String) {
    kubectl(&["exec", "-n", ns, pod, "--", "cat", path])
}

/// The driver is registered (CSINode) and the pod's `/readyz` answers 200, through the
/// apiserver's proxy (as any client of the cluster reaches it).
fn assert_registered_and_ready(node_pod: &str, when: &str) {
    let drivers = get("", "csinode", "kb-node", "{.spec.drivers[*].name}");
    assert!(
        drivers.contains("csi.keybroker.io"),
        "the driver is registered {when}: {drivers:?}"
    );
    let (ok, body) = kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/kube-system/pods/{node_pod}:9808/proxy/readyz"),
    ]);
    assert!(ok, "/readyz of {node_pod} {when}: {body}");
}

#[test]
fn the_chart_in_a_real_cluster_serves_pods_through_kubelet() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let secrets = tmp.path().join("dev-secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("db"), SECRET).unwrap();
    let audit_log = tmp.path().join("audit/audit.jsonl");
    let started = Instant::now();
    let _cluster = Cluster::up();
    println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());

    // The chart, as a platform team installs it: the locally built image, bindings that give
    // team-a/api the local provider's `db`, that directory mounted into keybroker, the audit
    // log in the test's directory.
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        chart_values(&format!(
            "bindings: |\n  bindings:\n    - name: team-a-dev\n      namespace: team-a\n      serviceAccounts: [api]\n      identity: {{local: {{path: /dev-secrets}}}}\n      objects: [db]\n    - name: team-a-guarded\n      namespace: team-a\n      serviceAccounts: [guarded]\n      identity: {{local: {{path: /dev-secrets}}}}\n      objects: [db]\n      readers: pod\n\
             extraVolumes:\n  - {{name: dev-secrets, hostPath: {{path: {}, type: Directory}}}}\n\
             extraVolumeMounts:\n  - {{name: dev-secrets, mountPath: /dev-secrets, readOnly: true}}\n\
             pollInterval: 2s\n\
             auditDir: {}\n\
             stateDir: {STATE_DIR}\n",
            secrets.display(),
            audit_log.parent().unwrap().display()
        )),
    )
    .unwrap();
    helm("install", &values, &[]);
    let (mut node_pod, took) = one_ready_node_pod("the DaemonSet Ready", |_, _| true);
    println!(
        "DaemonSet Ready {:.1} s after helm install",
        took.as_secs_f64()
    );
    // Registered with kubelet by keybroker itself: the CSINode object lists the driver.
    eventually("csi.keybroker.io in CSINode", || {
        get("", "csinode", "kb-node", "{.spec.drivers[*].name}").contains("csi.keybroker.io")
    });
    assert_registered_and_ready(&node_pod, "after helm install");
    eventually("the fd keeper running", || {
        get(
            "kube-system",
            "ds",
            "keybroker-fd-keeper",
            "{.status.numberReady}",
        ) == "1"
    });

    for ns in ["team-a", "team-b"] {
        must(&["create", "namespace", ns]);
    }
    must(&["create", "serviceaccount", "-n", "team-a", "api"]);
    must(&["create", "serviceaccount", "-n", "team-b", "api"]);
    must(&["create", "serviceaccount", "-n", "team-a", "guarded"]);
    // The default service accounts need no wait: the test's own are created above.
    let volumes = [
        csi_volume("t", "tmpfs", PASSWORD),
        csi_volume("f", "fuse", PASSWORD),
    ];
    apply(&pod("reader", "team-a", "api", READER, &volumes));
    apply(&pod(
        "stranger",
        "team-b",
        "api",
        "sleep 3600",
        &volumes[..1],
    ));
    let took = eventually("the reader Running", || {
        phase("team-a", "reader") == "Running"
    });
    println!(
        "reader (tmpfs and FUSE volume) Running after {:.1} s",
        took.as_secs_f64()
    );
    for dir in ["/t", "/f"] {
        let (ok, got) = read_in("team-a", "reader", &format!("{dir}/password"));
        assert!(ok, "{got}");
        assert_eq!(got, SECRET, "the reader reads its secret in {dir}");
        // Read-only, the mode asked for.
        let (_, ls) = kubectl(&[
            "exec",
            "-n",
            "team-a",
            "reader",
            "--",
            "sh",
            "-c",
            &format!("stat -L -c %a {dir}/password; touch {dir}/x 2>&1 || true"),
        ]);
        assert!(ls.starts_with("440"), "{dir}: {ls}");
        assert!(ls.contains("Read-only file system"), "{dir}: {ls}");
    }
    // A pod no binding grants: ContainerCreating, and its FailedMount event says why.
    eventually("the stranger's FailedMount event", || {
        events("team-b", "stranger", "FailedMount").contains("PermissionDenied")
    });
    let msg = events("team-b", "stranger", "FailedMount");
    println!("the stranger's FailedMount: {msg}");
    assert!(msg.contains("team-b"), "names the pod: {msg}");
    assert!(msg.contains("binding"), "says what to change: {msg}");
    assert!(
        !msg.contains(SECRET) && !msg.contains("eyJ"),
        "no secret, no token: {msg}"
    );
    assert_eq!(phase("team-b", "stranger"), "Pending");

    // Hostile pod input through the real path: more objects than a volume may have, and a
    // file name that climbs out of the volume. Refused with an event saying what is wrong;
    // the reader beside them keeps reading (counted below).
    let many: String = (0..200)
        .map(|i| format!("- objectName: f{i}\n  object: db\n"))
        .collect();
    apply(&pod(
        "hostile-count",
        "team-a",
        "api",
        "sleep 3600",
        &[csi_volume("t", "tmpfs", &many)],
    ));
    apply(&pod(
        "hostile-path",
        "team-a",
        "api",
        "sleep 3600",
        &[csi_volume(
            "t",
            "fuse",
            "- objectName: ../../../../etc/shadow\n  object: db\n",
        )],
    ));
    for name in ["hostile-count", "hostile-path"] {
        eventually(&format!("{name}'s FailedMount event"), || {
            events("team-a", name, "FailedMount").contains("InvalidArgument")
        });
        let msg = events("team-a", name, "FailedMount");
        println!("{name}'s FailedMount: {msg}");
        assert!(!msg.contains(SECRET), "{msg}");
        assert_eq!(phase("team-a", name), "Pending");
    }

    // A source change reaches the running pod (poll interval 2 s).
    std::fs::write(secrets.join("db"), SECRET_V2).unwrap();
    let changed = Instant::now();
    for dir in ["/t", "/f"] {
        eventually(&format!("{dir} sees the new value"), || {
            read_in("team-a", "reader", &format!("{dir}/password")).1 == SECRET_V2
        });
        println!(
            "{dir}: the new value in the pod {:.1} s after the change (poll interval 2 s)",
            changed.elapsed().as_secs_f64()
        );
    }

    // Three disruptions of keybroker, each timed on the node's clock: the reader's intervals
    // that overlap one are its pauses.
    let mut windows: Vec<(&str, u64, u64)> = Vec::new();
    // Meanwhile the driver must stay registered throughout (kubelet's view: CSINode), not only
    // after each disruption: a watcher asks the apiserver over and over.
    let stop_watch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop_watch.clone();
        std::thread::spawn(move || {
            let (mut looks, mut missing) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (ok, drivers) = kubectl(&[
                    "get",
                    "csinode",
                    "kb-node",
                    "-o",
                    "jsonpath={.spec.drivers[*].name}",
                ]);
                looks += 1;
                if ok && !drivers.contains("csi.keybroker.io") {
                    missing.push(micros_now());
                }
            }
            (looks, missing)
        })
    };

    // 1. An upgrade (a changed pod annotation rolls the DaemonSet: a surge pod takes the
    // volumes over from the old one).
    let t0 = micros_now();
    let old = node_pod.clone();
    helm(
        "upgrade",
        &values,
        &["--set-string", "podAnnotations.rollout=2"],
    );
    let (now_pod, took) = one_ready_node_pod("the upgrade rolled out", |n, _| n != old);
    windows.push(("helm upgrade (surge handover)", t0, micros_now()));
    println!("upgrade rolled out in {:.1} s", took.as_secs_f64());
    node_pod = now_pod;
    assert_registered_and_ready(&node_pod, "after the upgrade");

    // 2. `kubectl delete pod` of the keybroker pod: the DaemonSet starts another; the fd
    // keeper (a pod of its own) holds the FUSE sessions meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = micros_now();
    let old = node_pod.clone();
    must(&["delete", "pod", "-n", "kube-system", &old, "--wait=false"]);
    let (now_pod, took) =
        one_ready_node_pod("a new keybroker pod after the deletion", |n, _| n != old);
    windows.push(("kubectl delete pod", t0, micros_now()));
    println!(
        "new keybroker pod ready {:.1} s after the deletion",
        took.as_secs_f64()
    );
    node_pod = now_pod;
    assert_registered_and_ready(&node_pod, "after the pod's deletion");

    // 3. kill -9 of the keybroker process in its container: kubelet restarts the container.
    std::thread::sleep(Duration::from_secs(2));
    let container = container_id("kube-system", &node_pod, "keybroker");
    let pid = container_process(&container, &["keybroker", "node"])
        .expect("the keybroker process of the node pod");
    let t0 = micros_now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let pod_name = node_pod.clone();
    let (_, took) = one_ready_node_pod("the keybroker container restarted", |n, restarts| {
        n == pod_name && restarts >= 1
    });
    windows.push(("kill -9 of keybroker", t0, micros_now()));
    println!(
        "keybroker container ready {:.1} s after kill -9",
        took.as_secs_f64()
    );
    assert_registered_and_ready(&node_pod, "after kill -9");
    // Rotation still reaches the pod through the keybroker that took over.
    std::fs::write(secrets.join("db"), "S3cret-cluster-db-v3").unwrap();
    for dir in ["/t", "/f"] {
        eventually(&format!("{dir} sees v3 after the restarts"), || {
            read_in("team-a", "reader", &format!("{dir}/password")).1 == "S3cret-cluster-db-v3"
        });
    }
    stop_watch.store(true, std::sync::atomic::Ordering::Relaxed);
    let (looks, missing) = watcher.join().unwrap();
    println!(
        "CSINode read {looks} times during the disruptions; the driver missing {} times",
        missing.len()
    );
    assert!(looks >= 3, "the watcher looked");
    assert!(
        missing.is_empty(),
        "the driver left CSINode at {missing:?} (µs)"
    );
    let after = micros_now();
    // The reader has read past the last disruption.
    eventually("the reader reading after the disruptions", || {
        kubectl(&["logs", "-n", "team-a", "reader"])
            .1
            .lines()
            .filter_map(|l| l.strip_prefix("N "))
            .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
            .any(|t| t > after)
    });
    let log = must(&["logs", "-n", "team-a", "reader"]);
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("ERR") || l.contains("can't"))
        .collect();
    let rounds = log
        .lines()
        .filter_map(|l| l.strip_prefix("N "))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let slow: Vec<(u64, u64)> = log
        .lines()
        .filter_map(|l| l.strip_prefix("SLOW "))
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let mut outside = 100_000u64;
    let mut longest: Vec<u64> = vec![0; windows.len()];
    for (end, gap) in &slow {
        let start = end - gap;
        match windows
            .iter()
            .position(|(_, t0, t1)| start < *t1 + 1_000_000 && *end > *t0)
        {
            Some(i) => longest[i] = longest[i].max(*gap),
            None => outside = outside.max(*gap),
        }
    }
    println!(
        "reader: {rounds}+ rounds of two reads every 10 ms, {} errors",
        errors.len()
    );
    for ((what, t0, t1), gap) in windows.iter().zip(&longest) {
        println!(
            "  {what}: {:.1} s until ready again; longest interval between two reads {} ms",
            (t1 - t0) as f64 / 1e6,
            (*gap).max(10_000) / 1000
        );
    }
    println!(
        "  elsewhere: longest interval {} ms (100 ms or less is not logged)",
        outside / 1000
    );
    assert!(errors.is_empty(), "the reader saw errors: {errors:?}");
    assert!(rounds >= 500, "the reader read: {log}");

    // The audit log names the reader's process, pod and container for its reads.
    let reader_uid = get("team-a", "pod", "reader", "{.metadata.uid}");
    let reader_container = container_id("team-a", "reader", "app");
    let records = common::audit_records(&audit_log);
    let mine: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "read" && r["process"]["pod_uid"] == reader_uid.as_str())
        .collect();
    let volumes: std::collections::BTreeSet<String> =
        mine.iter().map(|r| r["volume"].to_string()).collect();
    assert_eq!(
        volumes.len(),
        2,
        "reads of both volumes are recorded: {volumes:?}"
    );
    assert!(
        mine.iter()
            .any(|r| r["process"]["container"] == reader_container.as_str()
                && r["process"]["comm"] == "sh"),
        "a read names the reader's container and process: {:?}",
        mine.first()
    );
    common::assert_no_secrets(
        &[SECRET, SECRET_V2, "S3cret-cluster-db-v3"],
        &[audit_log.parent().unwrap()],
        &[],
    );

    readers_pod_in_the_cluster(&audit_log);

    // Pod deletion unpublishes: no mount, staging directory or record left on the node.
    for (ns, name) in [
        ("team-a", "guarded"),
        ("team-b", "snoop"),
        ("team-a", "reader"),
        ("team-a", "hostile-count"),
        ("team-a", "hostile-path"),
        ("team-b", "stranger"),
    ] {
        must(&["delete", "pod", "-n", ns, name, "--wait=true"]);
    }
    eventually("no keybroker mount on the node", || {
        keybroker_mounts().is_empty()
    });
    let left = |dir: &str| -> Vec<String> {
        std::fs::read_dir(Path::new(STATE_DIR).join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually("no volume record or staging directory left", || {
        left("volumes").is_empty() && left("staging").is_empty()
    });

    // Uninstalled, keybroker's log verifies: one chain across the three processes it ran as.
    uninstall();
    let out = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["audit", "verify"])
        .arg(&audit_log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `readers: pod` under a real kubelet: the app container and `kubectl exec` into it read its
/// volumes; a privileged pod with a hostPath of kubelet's pod directory (a debug pod, a
/// compromised agent with host mounts) is refused on both volume types, and the audit log
/// names that pod.
fn readers_pod_in_the_cluster(audit_log: &Path) {
    let volumes = [
        csi_volume("t", "tmpfs", PASSWORD),
        csi_volume("f", "fuse", PASSWORD),
    ];
    // Reads from the app container's own process (its log says what it got, lengths only).
    apply(&pod(
        "guarded",
        "team-a",
        "guarded",
        "for d in t f; do v=$(cat /$d/password) && echo \"app read $d: ${#v} bytes\"; done; sleep 3600",
        &volumes,
    ));
    eventually("the guarded pod Running", || {
        phase("team-a", "guarded") == "Running"
    });
    let value = "S3cret-cluster-db-v3";
    eventually("the app container's own reads", || {
        let log = kubectl(&["logs", "-n", "team-a", "guarded"]).1;
        log.contains("app read t: 20 bytes") && log.contains("app read f: 20 bytes")
    });
    for dir in ["/t", "/f"] {
        let (ok, got) = read_in("team-a", "guarded", &format!("{dir}/password"));
        assert!(ok && got == value, "kubectl exec reads {dir}: {got}");
    }
    let uid = get("team-a", "pod", "guarded", "{.metadata.uid}");
    // The snoop: privileged, the host's kubelet pod directory mounted.
    let snoop = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "snoop", "namespace": "team-b"},
        "spec": {
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "debug",
                "image": "localhost/busybox:kb",
                "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                "securityContext": {"privileged": true},
                "volumeMounts": [{"name": "pods", "mountPath": "/host-pods", "mountPropagation": "HostToContainer"}],
            }],
            "volumes": [{"name": "pods", "hostPath": {"path": "/var/lib/kubelet/pods", "type": "Directory"}}],
        }
    });
    apply(&snoop.to_string());
    eventually("the snoop Running", || {
        phase("team-b", "snoop") == "Running"
    });
    let snoop_uid = get("team-b", "pod", "snoop", "{.metadata.uid}");
    for (vol, refusal) in [("t", "Operation not permitted"), ("f", "Permission denied")] {
        let path = format!("/host-pods/{uid}/volumes/kubernetes.io~csi/{vol}/mount/password");
        // The file is there for it to see, and refused.
        let (_, listed) = kubectl(&["exec", "-n", "team-b", "snoop", "--", "ls", &path]);
        assert!(listed.trim().ends_with("password"), "{path}: {listed}");
        let (ok, said) = kubectl(&["exec", "-n", "team-b", "snoop", "--", "cat", &path]);
        println!("the privileged snoop reading {vol}: {said}");
        assert!(!ok && said.contains(refusal), "{vol}: {said}");
        assert!(!said.contains(value), "{vol}: the value leaked");
    }
    // The app still reads (nothing about the snoop changed that).
    for dir in ["/t", "/f"] {
        let (ok, got) = read_in("team-a", "guarded", &format!("{dir}/password"));
        assert!(ok && got == value, "{dir} after the snoop: {got}");
    }
    // Both refusals are deny records naming the snoop's pod, its uid and its command, on the
    // guarded pod's volumes.
    let denied = || -> Vec<serde_json::Value> {
        common::audit_records(audit_log)
            .into_iter()
            .filter(|r| {
                r["event"] == "deny"
                    && r["reason"] == "readers"
                    && r["process"]["pod"] == "team-b/snoop"
            })
            .collect()
    };
    eventually("two deny records naming team-b/snoop", || {
        let d = denied();
        d.iter()
            .any(|r| r["file"] == "password" && r["pod"]["name"] == "guarded")
            && d.iter()
                .map(|r| r["volume"].to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 2
    });
    let d = denied();
    println!(
        "deny records for the snoop: {}",
        serde_json::to_string(&d[0]).unwrap()
    );
    assert!(
        d.iter()
            .all(|r| r["process"]["pod_uid"] == snoop_uid.as_str()
                && r["process"]["comm"] == "cat"
                && r["pod"]["uid"] == uid.as_str()
                && r["outcome"] == "denied"),
        "{d:#?}"
    );
}
