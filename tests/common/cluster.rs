//! A real single-node Kubernetes cluster (`scripts/cluster.sh`) for tests and benches: the
//! cluster itself (torn down on drop), kubectl and helm through the script, and the pods and
//! keybroker volumes they create.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn script(args: &[&str]) -> Output {
    Command::new(repo().join("scripts/cluster.sh"))
        .args(args)
        .output()
        .expect("scripts/cluster.sh")
}

pub fn kubectl(args: &[&str]) -> (bool, String) {
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

pub fn must(args: &[&str]) -> String {
    let (ok, out) = kubectl(args);
    assert!(ok, "kubectl {args:?}: {out}");
    out
}

pub fn apply(yaml: &str) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    must(&["apply", "-f", f.path().to_str().unwrap()]);
}

/// Polls `f` every second until it holds (the bound only keeps a broken build from hanging CI).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
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
pub struct Cluster;

impl Cluster {
    pub fn up() -> Self {
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
        if std::thread::panicking() {
            // What an operator would look at first.
            for args in [
                &["get", "pods", "-A", "-o", "wide"][..],
                &["get", "events", "-A", "--sort-by=.lastTimestamp"],
                &[
                    "logs",
                    "-n",
                    "kube-system",
                    "-l",
                    "app.kubernetes.io/name=keybroker",
                    "--all-containers",
                    "--tail=40",
                ],
                &[
                    "logs",
                    "-n",
                    "kube-system",
                    "-l",
                    "app.kubernetes.io/name=keybroker-fd-keeper",
                    "--tail=40",
                ],
                &[
                    "logs",
                    "-n",
                    "kube-system",
                    "-l",
                    "app.kubernetes.io/name=keybroker-provider",
                    "--tail=40",
                ],
                &[
                    "logs",
                    "-n",
                    "kube-system",
                    "-l",
                    "app=csi-secrets-store",
                    "--all-containers",
                    "--tail=40",
                ],
            ] {
                println!("--- kubectl {}\n{}", args.join(" "), kubectl(args).1);
            }
            // Every pod outside kube-system: its containers' last lines (an init container's
            // crash loop says why there).
            let pods = kubectl(&[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
            ])
            .1;
            for (ns, name) in pods.lines().filter_map(|l| l.split_once(' ')) {
                if ns != "kube-system" {
                    let args = [
                        "logs",
                        "-n",
                        ns,
                        name,
                        "--all-containers",
                        "--prefix",
                        "--tail=20",
                    ];
                    println!("--- kubectl {}\n{}", args.join(" "), kubectl(&args).1);
                }
            }
        }
        let out = script(&["down"]);
        println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    }
}

/// A keybroker volume of the local provider.
pub fn csi_volume(name: &str, volume_type: &str, objects: &str) -> serde_json::Value {
    csi_volume_with(
        name,
        serde_json::json!({"provider": "local", "volumeType": volume_type, "objects": objects}),
    )
}

/// A keybroker volume `name` with the volume attributes `attributes` (a JSON object).
pub fn csi_volume_with(name: &str, attributes: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "csi": {
            "driver": "csi.keybroker.io",
            "readOnly": true,
            "volumeAttributes": attributes,
        }
    })
}

/// The chart's values for the locally built image (never pulled), small requests, and
/// `extra` (YAML lines).
pub fn chart_values(extra: &str) -> String {
    let (repository, tag) = image_reference();
    format!(
        "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n\
         resources: {{requests: {{cpu: 10m, memory: 16Mi}}}}\n\
         podLogDir: /run/keybroker-cluster/pod-logs\n{extra}"
    )
}

/// A busybox pod of `sa` in `ns` running `script`, with the given keybroker volumes mounted at
/// `/<name>`.
pub fn pod(name: &str, ns: &str, sa: &str, script: &str, volumes: &[serde_json::Value]) -> String {
    let mounts: Vec<serde_json::Value> = volumes
        .iter()
        .map(|v| serde_json::json!({"name": v["name"], "mountPath": format!("/{}", v["name"].as_str().unwrap()), "readOnly": true}))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "serviceAccountName": sa,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": "localhost/busybox:kb",
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    })
    .to_string()
}

/// A field of an object (`ns` empty: a cluster-scoped one).
pub fn get(ns: &str, kind: &str, name: &str, jsonpath: &str) -> String {
    let jsonpath = format!("jsonpath={jsonpath}");
    let mut args = vec!["get", kind, name, "-o", &jsonpath];
    if !ns.is_empty() {
        args.extend(["-n", ns]);
    }
    kubectl(&args).1
}

pub fn phase(ns: &str, name: &str) -> String {
    get(ns, "pod", name, "{.status.phase}")
}

pub fn events(ns: &str, name: &str, reason: &str) -> String {
    kubectl(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        &format!("involvedObject.name={name},reason={reason}"),
        "-o",
        "jsonpath={.items[*].message}",
    ])
    .1
}

pub fn keybroker_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - tmpfs keybroker ") || l.contains(" - fuse.keybroker "))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

/// The keybroker node pods: (name, keybroker container ready, its restart count).
pub fn node_pods() -> Vec<(String, bool, u32)> {
    kubectl(&[
        "get",
        "pods",
        "-n",
        "kube-system",
        "-l",
        "app.kubernetes.io/name=keybroker",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[?(@.name==\"keybroker\")].ready} {.status.containerStatuses[?(@.name==\"keybroker\")].restartCount}{\"\\n\"}{end}",
    ])
    .1
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        Some((
            f.next()?.to_owned(),
            f.next() == Some("true"),
            f.next().and_then(|n| n.parse().ok()).unwrap_or(0),
        ))
    })
    .collect()
}

/// Waits until exactly one node pod runs, ready, and `pred` holds for it.
pub fn one_ready_node_pod(what: &str, pred: impl Fn(&str, u32) -> bool) -> (String, Duration) {
    let mut found = String::new();
    let took = eventually(what, || match node_pods().as_slice() {
        [(name, true, restarts)] if pred(name, *restarts) => {
            found = name.clone();
            true
        }
        _ => false,
    });
    (found, took)
}

pub fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The process of a container (by its id) whose command line starts with `args`.
pub fn container_process(container: &str, args: &[&str]) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if !cgroup.contains(container) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.len() > args.len() && argv[0].ends_with(args[0]) && argv[1..args.len()] == args[1..]
        {
            return Some(pid);
        }
    }
    None
}

pub fn container_id(ns: &str, pod: &str, container: &str) -> String {
    get(
        ns,
        "pod",
        pod,
        &format!("{{.status.containerStatuses[?(@.name==\"{container}\")].containerID}}"),
    )
    .trim_start_matches("containerd://")
    .to_owned()
}

/// The image `scripts/build-image.sh` exported (`target/image/keybroker.oci.tar`), by the
/// repository and tag it carries (`scripts/cluster.sh up` imports it as such).
pub fn image_reference() -> (String, String) {
    let image = repo().join("target/image/keybroker.oci.tar");
    assert!(
        image.exists(),
        "{} is missing: scripts/build-image.sh builds it (scripts/test.sh does)",
        image.display()
    );
    let index = Command::new("tar")
        .arg("-xOf")
        .arg(&image)
        .arg("index.json")
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
    let reference = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("the image archive names its image");
    let (repository, tag) = reference.rsplit_once(':').unwrap();
    (repository.to_owned(), tag.to_owned())
}

/// `helm VERB keybroker deploy/helm/keybroker -n kube-system -f VALUES EXTRA...`; panics with
/// helm's error.
pub fn helm(verb: &str, values: &Path, extra: &[&str]) {
    let chart = repo().join("deploy/helm/keybroker");
    let mut args = vec![
        "helm",
        verb,
        "keybroker",
        chart.to_str().unwrap(),
        "--namespace",
        "kube-system",
        "-f",
        values.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = script(&args);
    assert!(
        out.status.success(),
        "helm {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `helm uninstall keybroker`, then waits until no keybroker pod is left.
pub fn uninstall() {
    let out = script(&[
        "helm",
        "uninstall",
        "keybroker",
        "--namespace",
        "kube-system",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("no keybroker pod left", || {
        kubectl(&["get", "pods", "-n", "kube-system", "-o", "name"])
            .1
            .lines()
            .all(|l| !l.contains("keybroker"))
    });
}

/// The Secrets Store CSI driver's version, as `scripts/cluster.sh` builds it.
pub const SECRETS_STORE_DRIVER: &str = "v1.6.0";

/// The directory of the driver's Go module (its `deploy/` manifests), from the module cache.
pub fn secrets_store_module() -> PathBuf {
    let out = Command::new("go")
        .args(["mod", "download", "-json"])
        .arg(format!(
            "sigs.k8s.io/secrets-store-csi-driver@{SECRETS_STORE_DRIVER}"
        ))
        .env("GOFLAGS", "-mod=mod")
        .current_dir("/tmp")
        .output()
        .expect("go mod download");
    assert!(
        out.status.success(),
        "go mod download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(v["Dir"].as_str().unwrap())
}

/// Installs the Secrets Store CSI driver the way its `deploy/` directory does: both CRDs, its
/// RBAC, its CSIDriver (plus `tokenRequests` for `audiences`, as its Helm chart's
/// `tokenRequests` value adds them) and its DaemonSet. The DaemonSet is the module's own with
/// only what cannot be the same here changed: the images (the driver built from its module;
/// the registrar and liveness probe are the stand-ins of `tests/driver-harness`, taking the
/// same flags), `imagePullPolicy: Never`, the host network (this cluster has no pod network),
/// and rotation on with `rotation_poll` (`--enable-secret-rotation`, as its docs say). Waits
/// until kubelet has registered the driver.
pub fn install_secrets_store_driver(audiences: &[&str], rotation_poll: &str) {
    let module = secrets_store_module();
    let deploy = module.join("deploy");
    for f in [
        "secrets-store.csi.x-k8s.io_secretproviderclasses.yaml",
        "secrets-store.csi.x-k8s.io_secretproviderclasspodstatuses.yaml",
        "rbac-secretproviderclass.yaml",
    ] {
        must(&["apply", "-f", deploy.join(f).to_str().unwrap()]);
    }
    let mut csidriver = std::fs::read_to_string(deploy.join("csidriver.yaml")).unwrap();
    csidriver.push_str("  tokenRequests:\n");
    for a in audiences {
        csidriver.push_str(&format!("  - audience: \"{a}\"\n"));
    }
    apply(&csidriver);
    let mut ds = std::fs::read_to_string(deploy.join("secrets-store-csi-driver.yaml")).unwrap();
    let image = "localhost/secrets-store-csi:kb";
    for (from, to) in [
        (
            "image: registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.16.0".to_string(),
            format!(
                "image: {image}\n          command: [\"/driver-harness\", \"-register\", \"/registration\"]"
            ),
        ),
        (
            format!("image: registry.k8s.io/csi-secrets-store/driver:{SECRETS_STORE_DRIVER}"),
            format!("image: {image}"),
        ),
        (
            "image: registry.k8s.io/sig-storage/livenessprobe:v2.18.0".to_string(),
            format!("image: {image}\n          command: [\"/driver-harness\", \"-liveness\"]"),
        ),
        (
            "imagePullPolicy: IfNotPresent".to_string(),
            "imagePullPolicy: Never".to_string(),
        ),
        (
            "\"--enable-secret-rotation=false\"".to_string(),
            "\"--enable-secret-rotation=true\"".to_string(),
        ),
        (
            "\"--rotation-poll-interval=2m\"".to_string(),
            format!("\"--rotation-poll-interval={rotation_poll}\""),
        ),
        (
            "      serviceAccountName: secrets-store-csi-driver\n".to_string(),
            "      serviceAccountName: secrets-store-csi-driver\n      hostNetwork: true\n"
                .to_string(),
        ),
    ] {
        assert!(
            ds.contains(&from),
            "the driver's DaemonSet has no {from:?}: is it still {SECRETS_STORE_DRIVER}?"
        );
        ds = ds.replace(&from, &to);
    }
    apply(&ds);
    eventually("kubelet registered secrets-store.csi.k8s.io", || {
        get("", "csinode", "kb-node", "{.spec.drivers[*].name}")
            .contains("secrets-store.csi.k8s.io")
    });
}

/// Removes what [`install_secrets_store_driver`] installed (pods using it must be gone).
pub fn uninstall_secrets_store_driver() {
    must(&[
        "delete",
        "daemonset",
        "-n",
        "kube-system",
        "csi-secrets-store",
        "--wait=true",
    ]);
    eventually("no driver pod left", || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app=csi-secrets-store",
            "-o",
            "name",
        ])
        .1
        .trim()
        .is_empty()
    });
    must(&["delete", "csidriver", "secrets-store.csi.k8s.io"]);
}

/// The Secrets Store CSI Azure provider's version, as `scripts/cluster.sh` builds it.
pub const AZURE_PROVIDER: &str = "v1.7.2";

/// Installs the Azure provider as its `deployment/provider-azure-installer.yaml` does (its
/// ServiceAccount and DaemonSet, in kube-system), with the image built here and, since Key
/// Vault and Entra are the stand-in whose CA is `ca_dir/ca.pem`, that CA as the provider's trust
/// (`SSL_CERT_FILE`, which Go's TLS honours). Waits until it is ready.
pub fn install_azure_provider(ca_dir: &Path) {
    let out = Command::new("go")
        .args(["mod", "download", "-json"])
        .arg(format!(
            "github.com/Azure/secrets-store-csi-driver-provider-azure@{AZURE_PROVIDER}"
        ))
        .env("GOFLAGS", "-mod=mod")
        .current_dir("/tmp")
        .output()
        .expect("go mod download");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file =
        Path::new(v["Dir"].as_str().unwrap()).join("deployment/provider-azure-installer.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    for doc in text.split("\n---\n") {
        let mut d: serde_json::Value = serde_norway::from_str(doc).unwrap();
        if d["kind"] == "DaemonSet" {
            let spec = &mut d["spec"]["template"]["spec"];
            let c = &mut spec["containers"][0];
            assert_eq!(
                c["image"],
                format!(
                    "mcr.microsoft.com/oss/v2/azure/secrets-store/provider-azure:{AZURE_PROVIDER}"
                )
            );
            c["image"] = "localhost/provider-azure:kb".into();
            c["imagePullPolicy"] = "Never".into();
            c["env"] = serde_json::json!([{"name": "SSL_CERT_FILE", "value": "/standin/ca.pem"}]);
            c["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "standin-ca", "mountPath": "/standin", "readOnly": true}));
            spec["volumes"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!(
                {"name": "standin-ca", "hostPath": {"path": ca_dir, "type": "Directory"}}));
        }
        d["metadata"]["namespace"] = "kube-system".into();
        apply(&d.to_string());
    }
    eventually("the Azure provider ready", || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app=csi-secrets-store-provider-azure",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].ready}",
        ])
        .1 == "true"
    });
}

/// The cluster's network namespace (OpenBao and the stand-ins are started in it).
pub const NETNS: &str = "/run/netns/kb-cluster";
/// The node's address in that namespace, where OpenBao and the stand-ins listen.
pub const NODE_IP: &str = "10.213.0.1";
/// The cluster's CA (the apiserver's serving certificate chains to it).
pub const CLUSTER_CA: &str = "/run/keybroker-cluster/pki/ca.crt";
/// The apiserver as service-account token issuer (`--service-account-issuer`).
pub const ISSUER: &str = "https://10.213.0.1:6443";

/// Lets anyone read the apiserver's OIDC discovery document and JWKS, as the Kubernetes
/// documentation describes for verifiers of service-account tokens outside the cluster
/// (OpenBao's jwt auth, Entra): `system:service-account-issuer-discovery` for
/// `system:unauthenticated`.
pub fn allow_anonymous_oidc_discovery() {
    must(&[
        "create",
        "clusterrolebinding",
        "oidc-discovery-anonymous",
        "--clusterrole=system:service-account-issuer-discovery",
        "--group=system:unauthenticated",
    ]);
}

/// HashiCorp's Vault CSI provider's version, built by `scripts/cluster.sh build` when a
/// snapshot of its repository is there (benchmarks only).
pub const VAULT_CSI_PROVIDER: &str = "v1.7.4";

/// Installs HashiCorp's Vault CSI provider as its `deployment/vault-csi-provider.yaml` does
/// (namespace `csi`, RBAC, DaemonSet), with the image built here and OpenBao's CA directory
/// `ca_dir` mounted at `/bao` (for the classes' `vaultCACertPath`). False when it was not built.
pub fn install_vault_csi_provider(ca_dir: &Path) -> bool {
    let cache = std::env::var("KEYBROKER_CLUSTER_CACHE")
        .unwrap_or_else(|_| "/var/cache/keybroker-cluster".into());
    let manifest = Path::new(&cache)
        .join("v1.35.4")
        .join(format!("vault-csi-provider-{VAULT_CSI_PROVIDER}.yaml"));
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return false;
    };
    for doc in text.split("\n---\n") {
        let mut d: serde_json::Value = match serde_norway::from_str(doc) {
            Ok(d) => d,
            Err(_) => continue,
        };
        if d["kind"] == "DaemonSet" {
            let spec = &mut d["spec"]["template"]["spec"];
            let c = &mut spec["containers"][0];
            assert_eq!(
                c["image"],
                format!("hashicorp/vault-csi-provider:{}", &VAULT_CSI_PROVIDER[1..])
            );
            c["image"] = "localhost/vault-csi-provider:kb".into();
            c["imagePullPolicy"] = "Never".into();
            c["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "bao-ca", "mountPath": "/bao", "readOnly": true}));
            spec["volumes"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!(
                {"name": "bao-ca", "hostPath": {"path": ca_dir, "type": "Directory"}}));
        }
        if d.is_object() {
            apply(&d.to_string());
        }
    }
    eventually("the Vault CSI provider ready", || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            "csi",
            "-l",
            "app.kubernetes.io/name=vault-csi-provider",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].ready}",
        ])
        .1 == "true"
    });
    true
}
