//! keybroker in a real single-node Kubernetes cluster (`scripts/cluster.sh`: kube-apiserver,
//! kubelet, controller-manager and scheduler v1.35.4 built from the Go module, Debian's etcd,
//! containerd and runc, in a network namespace of its own). The Helm chart is installed with
//! the image `scripts/build-image.sh` built, and kubelet itself calls keybroker: registration
//! through `plugins_registry`, NodePublishVolume with its own pod info and the apiserver's
//! tokens, NodeUnpublishVolume at pod deletion.
//!
//! One test function: there is one cluster on the machine at a time. It is brought up here and
//! torn down when the test ends, however it ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script(args: &[&str]) -> Output {
    Command::new(repo().join("scripts/cluster.sh"))
        .args(args)
        .output()
        .expect("scripts/cluster.sh")
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let mut all = vec!["kubectl"];
    all.extend_from_slice(args);
    let out = script(&all);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn must(args: &[&str]) -> String {
    let (ok, out) = kubectl(args);
    assert!(ok, "kubectl {args:?}: {out}");
    out
}

fn apply(yaml: &str) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    must(&["apply", "-f", f.path().to_str().unwrap()]);
}

/// Polls `f` every second until it holds (the bound only keeps a broken build from hanging CI).
fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    start.elapsed()
}

/// The cluster, torn down on drop (every process, mount, cgroup, sysctl, the namespace).
struct Cluster;

impl Cluster {
    fn up() -> Self {
        let out = script(&["up"]);
        let c = Cluster;
        assert!(
            out.status.success(),
            "scripts/cluster.sh up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = script(&["down"]);
        println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    }
}

const SECRET: &str = "S3cret-cluster-db-4242";

fn pod(name: &str, ns: &str, sa: &str, volume_type: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  serviceAccountName: {sa}
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: localhost/busybox:kb
      imagePullPolicy: Never
      command: ["sh", "-c", "sleep 3600"]
      volumeMounts:
        - {{name: secrets, mountPath: /secrets, readOnly: true}}
  volumes:
    - name: secrets
      csi:
        driver: csi.keybroker.io
        readOnly: true
        volumeAttributes:
          provider: local
          volumeType: {volume_type}
          objects: |
            - objectName: password
              object: db
              filePermission: "0440"
"#
    )
}

/// What `cat PATH` prints in the pod's app container (and whether it succeeded).
fn read_in(ns: &str, pod: &str, path: &str) -> (bool, String) {
    kubectl(&["exec", "-n", ns, pod, "--", "cat", path])
}

fn phase(ns: &str, name: &str) -> String {
    kubectl(&[
        "get",
        "pod",
        "-n",
        ns,
        name,
        "-o",
        "jsonpath={.status.phase}",
    ])
    .1
}

fn keybroker_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - tmpfs keybroker ") || l.contains(" - fuse.keybroker "))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

#[test]
fn the_chart_in_a_real_cluster_serves_pods_through_kubelet() {
    common::require_root_and_fuse();
    let image = repo().join("target/image/keybroker.oci.tar");
    assert!(
        image.exists(),
        "{} is missing: scripts/build-image.sh builds it (scripts/test.sh does)",
        image.display()
    );
    let tmp = common::open_tempdir();
    let secrets = tmp.path().join("dev-secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("db"), SECRET).unwrap();
    let started = Instant::now();
    let _cluster = Cluster::up();
    println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());

    // The chart, as a platform team installs it: the locally built image, bindings that give
    // team-a/api the local provider's `db`, that directory mounted into keybroker. The audit
    // log goes to the test's directory; the state directory must be on a shared mount (its
    // tmpfs staging mounts propagate to the host): kubelet's directory is one, and goes with
    // the cluster.
    // The image scripts/build-image.sh exported, by the name it carries (imported as such).
    let index = Command::new("tar")
        .arg("-xOf")
        .arg(&image)
        .arg("index.json")
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
    let reference = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("the image archive names its image")
        .to_owned();
    let (repository, tag) = reference.rsplit_once(':').unwrap();
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n\
             bindings: |\n  bindings:\n    - name: team-a-dev\n      namespace: team-a\n      serviceAccounts: [api]\n      identity: {{local: {{path: /dev-secrets}}}}\n      objects: [db]\n\
             extraVolumes:\n  - {{name: dev-secrets, hostPath: {{path: {}, type: Directory}}}}\n\
             extraVolumeMounts:\n  - {{name: dev-secrets, mountPath: /dev-secrets, readOnly: true}}\n\
             resources: {{requests: {{cpu: 10m, memory: 16Mi}}}}\n\
             auditDir: {}\n\
             stateDir: /var/lib/kubelet/plugins/csi.keybroker.io/state\n",
            secrets.display(),
            tmp.path().join("audit").display()
        ),
    )
    .unwrap();
    let out = script(&[
        "helm",
        "install",
        "keybroker",
        repo().join("deploy/helm/keybroker").to_str().unwrap(),
        "--namespace",
        "kube-system",
        "-f",
        values.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = eventually("the DaemonSet Ready", || {
        kubectl(&[
            "get",
            "ds",
            "-n",
            "kube-system",
            "keybroker-node",
            "-o",
            "jsonpath={.status.numberReady}",
        ])
        .1 == "1"
    });
    println!(
        "DaemonSet Ready {:.1} s after helm install",
        took.as_secs_f64()
    );
    // Registered with kubelet by keybroker itself: the CSINode object lists the driver.
    eventually("csi.keybroker.io in CSINode", || {
        kubectl(&[
            "get",
            "csinode",
            "kb-node",
            "-o",
            "jsonpath={.spec.drivers[*].name}",
        ])
        .1
        .contains("csi.keybroker.io")
    });

    for ns in ["team-a", "team-b"] {
        must(&["create", "namespace", ns]);
    }
    must(&["create", "serviceaccount", "-n", "team-a", "api"]);
    must(&["create", "serviceaccount", "-n", "team-b", "api"]);
    // The default service accounts need no wait: the test's own are created above.
    apply(&pod("reader-tmpfs", "team-a", "api", "tmpfs"));
    apply(&pod("reader-fuse", "team-a", "api", "fuse"));
    apply(&pod("stranger", "team-b", "api", "tmpfs"));
    for name in ["reader-tmpfs", "reader-fuse"] {
        let took = eventually(&format!("{name} Running"), || {
            phase("team-a", name) == "Running"
        });
        println!("{name} Running after {:.1} s", took.as_secs_f64());
        let (ok, got) = read_in("team-a", name, "/secrets/password");
        assert!(ok, "{got}");
        assert_eq!(got, SECRET, "{name} reads its secret");
        // Read-only, the mode asked for.
        let (_, ls) = kubectl(&[
            "exec",
            "-n",
            "team-a",
            name,
            "--",
            "sh",
            "-c",
            "stat -L -c %a /secrets/password; touch /secrets/x 2>&1 || true",
        ]);
        assert!(ls.starts_with("440"), "{name}: {ls}");
        assert!(ls.contains("Read-only file system"), "{name}: {ls}");
    }
    // A pod no binding grants: ContainerCreating, and its FailedMount event says why.
    let event = || {
        kubectl(&[
            "get",
            "events",
            "-n",
            "team-b",
            "--field-selector",
            "involvedObject.name=stranger,reason=FailedMount",
            "-o",
            "jsonpath={.items[*].message}",
        ])
        .1
    };
    eventually("the stranger's FailedMount event", || {
        event().contains("PermissionDenied")
    });
    let msg = event();
    assert!(msg.contains("team-b"), "names the pod: {msg}");
    assert!(!msg.contains(SECRET));
    assert_eq!(phase("team-b", "stranger"), "Pending");

    // A source change reaches the running pod.
    std::fs::write(secrets.join("db"), "S3cret-cluster-db-v2").unwrap();
    for name in ["reader-tmpfs", "reader-fuse"] {
        let took = eventually(&format!("{name} sees the new value"), || {
            read_in("team-a", name, "/secrets/password").1 == "S3cret-cluster-db-v2"
        });
        println!("{name}: new value after {:.1} s", took.as_secs_f64());
    }

    // An upgrade (a changed pod annotation rolls the DaemonSet: a surge pod takes the volumes
    // over from the old one): the driver stays registered, the pods keep reading.
    let old_pod = must(&[
        "get",
        "pods",
        "-n",
        "kube-system",
        "-l",
        "app.kubernetes.io/name=keybroker",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let out = script(&[
        "helm",
        "upgrade",
        "keybroker",
        repo().join("deploy/helm/keybroker").to_str().unwrap(),
        "--namespace",
        "kube-system",
        "-f",
        values.to_str().unwrap(),
        "--set-string",
        "podAnnotations.rollout=2",
    ]);
    assert!(
        out.status.success(),
        "helm upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = eventually("the upgrade rolled out", || {
        let pods = kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/name=keybroker",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[?(@.name==\"keybroker\")].ready}{\"\\n\"}{end}",
        ])
        .1;
        let lines: Vec<&str> = pods.lines().filter(|l| !l.is_empty()).collect();
        lines.len() == 1 && !lines[0].starts_with(&old_pod) && lines[0].ends_with(" true")
    });
    println!("upgrade rolled out in {:.1} s", took.as_secs_f64());
    let drivers = must(&[
        "get",
        "csinode",
        "kb-node",
        "-o",
        "jsonpath={.spec.drivers[*].name}",
    ]);
    assert!(
        drivers.contains("csi.keybroker.io"),
        "the driver is registered after the upgrade: {drivers:?}"
    );
    for name in ["reader-tmpfs", "reader-fuse"] {
        let (ok, got) = read_in("team-a", name, "/secrets/password");
        assert!(
            ok && got == "S3cret-cluster-db-v2",
            "{name} after the upgrade: {got}"
        );
    }

    // Pod deletion unpublishes: no keybroker mount left on the node.
    for (ns, name) in [
        ("team-a", "reader-tmpfs"),
        ("team-a", "reader-fuse"),
        ("team-b", "stranger"),
    ] {
        must(&["delete", "pod", "-n", ns, name, "--wait=true"]);
    }
    eventually("no keybroker mount on the node", || {
        keybroker_mounts().is_empty()
    });
    assert!(!Path::new("/var/lib/kubelet/pods").exists() || keybroker_mounts().is_empty());
}
