//! Providers behind the real Secrets Store CSI driver (issue #23), in the cluster of
//! `scripts/cluster.sh`, all in one run:
//! - 20 pods at once, each with a `secretProviderClass` volume of 10 objects, from `kubectl
//!   apply` to all Ready; the requests OpenBao / the Entra + Key Vault stand-in answered for
//!   those mounts; then the requests per minute while the driver's rotation
//!   (`--rotation-poll-interval=30s`) keeps calling Mount for the 20 pods; the provider pod's
//!   memory (its cgroup, less inactive file) with the 20 pods mounted. For keybroker's provider
//!   mode against OpenBao and the stand-in, the Secrets Store Azure provider v1.7.2 against the
//!   same stand-in, and HashiCorp's Vault CSI provider v1.7.4 against the same OpenBao when
//!   `scripts/cluster.sh build` could build it (it needs a snapshot of its repository, see
//!   BENCHMARKS.md); rounds alternate the kinds;
//! - the same 20 pods through keybroker's own node volumes (no driver), against provider mode;
//! - 20 pods with keybroker as a native sidecar (10 files from OpenBao) against 20 pods with
//!   no secrets at all.
//!
//! Run (root, after `scripts/cluster.sh build` and `scripts/build-image.sh`):
//! `cargo bench --bench cluster_providers` (`KB_ROUNDS=2` rounds by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::azure::{APP, AzureStandin, TENANT};
use common::bench::pct;
use common::cluster::*;
use common::peers::Bao;

const PODS: usize = 20;
const OBJECTS: usize = 10;
const NS: &str = "bench";
/// How long the rotation window is watched (the driver polls every 30 s; kubelet's republish
/// sets the pace).
const WINDOW: Duration = Duration::from_secs(120);
const WI_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A provider behind the driver: its class parameters and where its pod is.
struct Kind {
    name: &'static str,
    provider: &'static str,
    vault: bool,
    /// Namespace and label selector of the provider's pod.
    pod: (&'static str, &'static str),
}

fn vault_objects() -> String {
    (0..OBJECTS)
        .map(|i| {
            format!("      - objectName: obj-{i}\n        secretPath: secret/data/bench/obj-{i}\n        secretKey: value\n")
        })
        .collect()
}

fn azure_objects() -> String {
    (0..OBJECTS)
        .map(|i| {
            format!("        - |\n          objectName: obj-{i}\n          objectType: secret\n")
        })
        .collect()
}

/// The SecretProviderClass of `kind`, in the Vault or Azure provider's parameters.
fn class(kind: &Kind, ca_in_provider: &str) -> String {
    let parameters = if kind.vault {
        format!(
            "    roleName: bench\n    vaultAddress: https://{NODE_IP}:8200\n    vaultAuthMountPath: jwt\n\
             \x20   audience: vault\n    vaultTLSServerName: localhost\n    vaultCACertPath: {ca_in_provider}\n\
             \x20   objects: |\n{}",
            vault_objects()
        )
    } else {
        format!(
            "    usePodIdentity: \"false\"\n    clientID: {APP}\n    keyvaultName: kv1\n    tenantId: {TENANT}\n\
             \x20   objects: |\n      array:\n{}",
            azure_objects()
        )
    };
    format!(
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n\
         metadata: {{name: {}, namespace: {NS}}}\nspec:\n  provider: {}\n  parameters:\n{parameters}",
        kind.name, kind.provider
    )
}

/// `n` pods `{prefix}-{i}` with `volume` (or none) at /v, as one List.
fn pods(prefix: &str, n: usize, volume: Option<serde_json::Value>) -> String {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let vols: Vec<serde_json::Value> = volume.iter().cloned().collect();
            serde_json::from_str(&pod(
                &format!("{prefix}-{i}"),
                NS,
                "app",
                "sleep 3600",
                &vols,
            ))
            .unwrap()
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Seconds from applying `list` (pods named `{prefix}-*`) to all `n` Ready.
fn start(prefix: &str, n: usize, list: &str) -> f64 {
    let t = Instant::now();
    apply(list);
    eventually(&format!("{n} pods {prefix} Ready"), || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])
        .1
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")) && l.ends_with(" True"))
        .count()
            == n
    });
    t.elapsed().as_secs_f64()
}

fn delete_all() {
    must(&[
        "delete",
        "pods",
        "-n",
        NS,
        "--all",
        "--wait=true",
        "--grace-period=1",
    ]);
}

/// Memory of the pod selected by `(ns, selector)`: its cgroup's usage less inactive file, MiB.
fn pod_memory((ns, selector): (&str, &str)) -> f64 {
    let uid = kubectl(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        selector,
        "-o",
        "jsonpath={.items[0].metadata.uid}",
    ])
    .1;
    let dir = ["besteffort", "burstable", "guaranteed"]
        .iter()
        .map(|q| format!("/sys/fs/cgroup/memory/kubepods/{q}/pod{uid}"))
        .chain(std::iter::once(format!(
            "/sys/fs/cgroup/memory/kubepods/pod{uid}"
        )))
        .find(|d| Path::new(d).exists())
        .unwrap_or_else(|| panic!("the memory cgroup of {ns}/{selector}"));
    let usage: f64 = std::fs::read_to_string(format!("{dir}/memory.usage_in_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let inactive: f64 = std::fs::read_to_string(format!("{dir}/memory.stat"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("total_inactive_file "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    (usage - inactive) / 1048576.0
}

/// Requests the peers have answered so far: (OpenBao logins, OpenBao reads, Entra, Key Vault).
fn requests(bao: &Bao, standin: &AzureStandin, rt: &tokio::runtime::Runtime) -> [usize; 4] {
    let mut n = [0; 4];
    for e in std::fs::read_to_string(&bao.audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "request")
    {
        let path = e["request"]["path"].as_str().unwrap_or_default();
        if path.starts_with("auth/jwt/login") {
            n[0] += 1;
        } else if path.starts_with("secret/") {
            n[1] += 1;
        }
    }
    for r in rt.block_on(standin.requests()) {
        match r["kind"].as_str() {
            Some("entra") => n[2] += 1,
            Some("keyvault") => n[3] += 1,
            _ => {}
        }
    }
    n
}

fn minus(a: [usize; 4], b: [usize; 4]) -> [usize; 4] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]]
}

/// One measured kind: start times, requests to mount, requests per minute after, memory.
#[derive(Default)]
struct Figures {
    start: Vec<f64>,
    mount: Vec<[usize; 4]>,
    per_minute: Vec<f64>,
    memory: Vec<f64>,
}

fn configure_peers(bao: &Bao, standin: &AzureStandin, dir: &Path, rt: &tokio::runtime::Runtime) {
    allow_anonymous_oidc_discovery();
    let policy = dir.join("bench.hcl");
    std::fs::write(
        &policy,
        "path \"secret/data/bench/*\" { capabilities = [\"read\"] }\n",
    )
    .unwrap();
    bao.cli(&["policy", "write", "bench", policy.to_str().unwrap()]);
    for i in 0..OBJECTS {
        bao.cli(&[
            "kv",
            "put",
            &format!("secret/bench/obj-{i}"),
            &format!("value=bench-{i}"),
        ]);
    }
    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!("oidc_discovery_url={ISSUER}"),
        &format!("oidc_discovery_ca_pem=@{CLUSTER_CA}"),
    ]);
    bao.cli(&[
        "write",
        "auth/jwt/role/bench",
        "role_type=jwt",
        "user_claim=sub",
        "bound_audiences=vault",
        &format!("bound_subject=system:serviceaccount:{NS}:app"),
        "token_policies=bench",
        "token_ttl=1h",
    ]);
    rt.block_on(async {
        standin.post("tenants", serde_json::json!({"tenant": TENANT})).await;
        standin
            .post(
                "apps",
                serde_json::json!({"tenant": TENANT, "clientId": APP, "federated": [
                    {"issuer": ISSUER, "subject": format!("system:serviceaccount:{NS}:app"), "audiences": [WI_AUDIENCE]}]}),
            )
            .await;
        standin
            .post("vaults", serde_json::json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read"}}))
            .await;
        for i in 0..OBJECTS {
            standin.secret("kv1", &format!("obj-{i}"), &format!("bench-{i}")).await;
        }
    });
}

/// The chart's values for `mode` with bindings for bench/app (Vault and Azure) and both CAs.
fn values(mode: &str, bao: &Bao, standin: &AzureStandin, dir: &Path) -> std::path::PathBuf {
    let f = dir.join(format!("values-{mode}.yaml"));
    std::fs::write(
        &f,
        chart_values(&format!(
            "mode: {mode}\nmetricsPort: 9810\n\
             bindings: |\n  bindings:\n\
             \x20   - {{name: bench-vault, namespace: {NS}, serviceAccounts: [app], identity: {{vault: {{address: \"https://{NODE_IP}:8200\", authMount: jwt, role: bench, caFile: /bao/vault-ca.pem, tlsServerName: localhost}}}}, objects: [\"secret/data/bench/*\"]}}\n\
             \x20   - {{name: bench-azure, namespace: {NS}, serviceAccounts: [app], identity: {{azure: {{tenantID: {TENANT}, clientID: {APP}, authorityHost: \"{}\", keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: /azure/ca.pem, keyvaults: [kv1]}}}}, objects: [\"secret/*\"]}}\n\
             extraVolumes:\n\
             \x20 - {{name: bao-ca, hostPath: {{path: {}, type: Directory}}}}\n\
             \x20 - {{name: azure-ca, hostPath: {{path: {}, type: Directory}}}}\n\
             extraVolumeMounts:\n\
             \x20 - {{name: bao-ca, mountPath: /bao, readOnly: true}}\n\
             \x20 - {{name: azure-ca, mountPath: /azure, readOnly: true}}\n\
             auditDir: {}\nstateDir: /var/lib/kubelet/keybroker-state\n",
            standin.authority(),
            standin.https_port,
            bao.ca.parent().unwrap().display(),
            standin.dir.display(),
            dir.join("audit").display(),
        )),
    )
    .unwrap();
    f
}

fn wait_provider_ready(selector: &str) {
    eventually(&format!("{selector} ready"), || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].ready}",
        ])
        .1 == "true"
    });
}

fn main() {
    common::require_root_and_fuse();
    let rounds: usize = std::env::var("KB_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let tmp = common::open_tempdir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = Cluster::up();
    let bao = Bao::start_in_netns(tmp.path(), Path::new(NETNS), NODE_IP);
    let standin = AzureStandin::start_in_netns(
        tmp.path(),
        Path::new(NETNS),
        &[
            "--issuer-ca",
            CLUSTER_CA,
            "--bind",
            "0.0.0.0",
            "--https-port",
            "443",
        ],
    );
    configure_peers(&bao, &standin, tmp.path(), &rt);
    install_secrets_store_driver(&["vault", WI_AUDIENCE], "30s");
    install_azure_provider(&standin.dir);
    let vault_csi = install_vault_csi_provider(bao.ca.parent().unwrap());
    helm(
        "install",
        &values("provider", &bao, &standin, tmp.path()),
        &[],
    );
    wait_provider_ready("app.kubernetes.io/name=keybroker-provider");
    must(&["create", "namespace", NS]);
    must(&["create", "serviceaccount", "-n", NS, "app"]);

    let mut kinds = vec![
        Kind {
            name: "keybroker-vault",
            provider: "keybroker",
            vault: true,
            pod: ("kube-system", "app.kubernetes.io/name=keybroker-provider"),
        },
        Kind {
            name: "keybroker-azure",
            provider: "keybroker",
            vault: false,
            pod: ("kube-system", "app.kubernetes.io/name=keybroker-provider"),
        },
        Kind {
            name: "azure-provider",
            provider: "azure",
            vault: false,
            pod: ("kube-system", "app=csi-secrets-store-provider-azure"),
        },
    ];
    if vault_csi {
        kinds.push(Kind {
            name: "vault-csi-provider",
            provider: "vault",
            vault: true,
            pod: ("csi", "app.kubernetes.io/name=vault-csi-provider"),
        });
    } else {
        println!(
            "HashiCorp's Vault CSI provider was not built (no snapshot of its repository): not measured"
        );
    }
    for k in &kinds {
        let ca = if k.provider == "vault" {
            "/bao/vault-ca.pem"
        } else {
            "/unused"
        };
        apply(&class(k, ca));
    }
    let mut figures: Vec<Figures> = kinds.iter().map(|_| Figures::default()).collect();
    for round in 0..rounds {
        for (i, k) in kinds.iter().enumerate() {
            let volume = serde_json::json!({"name": "v", "csi": {"driver": "secrets-store.csi.k8s.io", "readOnly": true, "volumeAttributes": {"secretProviderClass": k.name}}});
            let before = requests(&bao, &standin, &rt);
            let prefix = format!("{}-r{round}", k.name);
            let s = start(&prefix, PODS, &pods(&prefix, PODS, Some(volume)));
            let mounted = requests(&bao, &standin, &rt);
            std::thread::sleep(WINDOW);
            let after = requests(&bao, &standin, &rt);
            let f = &mut figures[i];
            f.start.push(s);
            f.mount.push(minus(mounted, before));
            f.per_minute.push(
                minus(after, mounted).iter().sum::<usize>() as f64 / (WINDOW.as_secs_f64() / 60.0),
            );
            f.memory.push(pod_memory(k.pod));
            println!(
                "round {round} {:<20} Ready {s:6.2} s; mount requests {:?}; then {:.1}/min; provider memory {:.1} MiB",
                k.name,
                f.mount.last().unwrap(),
                f.per_minute.last().unwrap(),
                f.memory.last().unwrap()
            );
            delete_all();
        }
    }

    // Node volumes (no driver) for the same pods, and the sidecar against a pod without secrets.
    uninstall();
    helm("install", &values("node", &bao, &standin, tmp.path()), &[]);
    one_ready_node_pod("keybroker node Ready", |_, _| true);
    let node_volume = csi_volume_with(
        "v",
        serde_json::json!({"provider": "vault", "roleName": "bench", "vaultAddress": format!("https://{NODE_IP}:8200"), "vaultAuthMountPath": "jwt", "objects": vault_objects().replace("\n      ", "\n").trim_start().to_string()}),
    );
    let mut node = Vec::new();
    let mut node_mount = Vec::new();
    for round in 0..rounds {
        let before = requests(&bao, &standin, &rt);
        let prefix = format!("node-r{round}");
        node.push(start(
            &prefix,
            PODS,
            &pods(&prefix, PODS, Some(node_volume.clone())),
        ));
        node_mount.push(minus(requests(&bao, &standin, &rt), before));
        println!(
            "round {round} node volumes Ready {:.2} s; mount requests {:?}",
            node.last().unwrap(),
            node_mount.last().unwrap()
        );
        delete_all();
    }
    let (plain, sidecar) = sidecar_rounds(rounds, &bao);
    uninstall();
    drop(standin);
    drop(bao);
    drop(cluster);

    println!();
    println!(
        "{PODS} pods x {OBJECTS} objects through the Secrets Store driver {SECRETS_STORE_DRIVER} ({rounds} rounds, median):"
    );
    println!(
        "  kind                  Ready s   mount requests (bao login/read, entra/kv)   per min after   provider MiB"
    );
    let kb_vault = pct(&mut figures[0].start.clone(), 0.5);
    for (i, k) in kinds.iter().enumerate() {
        let f = &mut figures[i];
        println!(
            "  {:<20} {:>7.2}   {:<42} {:>8.1}      {:>8.1}",
            k.name,
            pct(&mut f.start, 0.5),
            format!("{:?}", f.mount.last().unwrap()),
            pct(&mut f.per_minute, 0.5),
            pct(&mut f.memory, 0.5)
        );
    }
    let node_med = pct(&mut node, 0.5);
    println!(
        "node volumes (keybroker node mode, OpenBao): Ready {node_med:.2} s, {:.2}x provider mode; mount requests {:?}",
        node_med / kb_vault,
        node_mount.last().unwrap()
    );
    let (p, s) = (pct(&mut plain.clone(), 0.5), pct(&mut sidecar.clone(), 0.5));
    println!(
        "sidecar pods (10 files from OpenBao): Ready {s:.2} s, {:.2}x pods without secrets ({p:.2} s)",
        s / p
    );
}

/// Rounds of 20 plain busybox pods and 20 pods with keybroker as a native sidecar (10 files
/// from OpenBao through jwt auth with the pod's projected token): (plain, sidecar) start times.
fn sidecar_rounds(rounds: usize, bao: &Bao) -> (Vec<f64>, Vec<f64>) {
    let files: String = (0..OBJECTS)
        .map(|i| format!("  - {{name: obj-{i}, object: secret/data/bench/obj-{i}, key: value}}\n"))
        .collect();
    let config = format!(
        "provider:\n  vault: {{address: \"https://{NODE_IP}:8200\", authMount: jwt, role: bench, caFile: /etc/keybroker/vault-ca.pem, tlsServerName: localhost}}\nfiles:\n{files}"
    );
    apply(
        &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "sidecar", "namespace": NS},
            "data": {"config.yaml": config, "vault-ca.pem": std::fs::read_to_string(&bao.ca).unwrap()}})
        .to_string(),
    );
    let (repository, tag) = image_reference();
    let sidecar_pods = |prefix: &str| -> String {
        let items: Vec<serde_json::Value> = (0..PODS)
            .map(|i| {
                let mut p: serde_json::Value = serde_json::from_str(&pod(&format!("{prefix}-{i}"), NS, "app", "sleep 3600", &[])).unwrap();
                p["spec"]["hostNetwork"] = false.into();
                p["spec"]["initContainers"] = serde_json::json!([{
                    "name": "keybroker", "image": format!("{repository}:{tag}"), "imagePullPolicy": "Never", "restartPolicy": "Always",
                    "args": ["sidecar", "--config", "/etc/keybroker/config.yaml", "--dir", "/run/secrets/app", "--audit-log", "-"],
                    "startupProbe": {"exec": {"command": ["/keybroker", "probe", "--dir", "/run/secrets/app"]}, "periodSeconds": 1, "failureThreshold": 120},
                    "securityContext": {"runAsUser": 65532, "runAsNonRoot": true, "readOnlyRootFilesystem": true},
                    "volumeMounts": [{"name": "secrets", "mountPath": "/run/secrets/app"}, {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}, {"name": "config", "mountPath": "/etc/keybroker", "readOnly": true}]
                }]);
                p["spec"]["securityContext"] = serde_json::json!({"runAsUser": 65532});
                p["spec"]["volumes"] = serde_json::json!([
                    {"name": "secrets", "emptyDir": {"medium": "Memory"}},
                    {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": "vault", "expirationSeconds": 3600, "path": "vault-token"}}]}},
                    {"name": "config", "configMap": {"name": "sidecar"}}]);
                p
            })
            .collect();
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    };
    let (mut plain, mut sidecar) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let prefix = format!("plain-r{round}");
        plain.push(start(&prefix, PODS, &pods(&prefix, PODS, None)));
        delete_all();
        let prefix = format!("sidecar-r{round}");
        sidecar.push(start(&prefix, PODS, &sidecar_pods(&prefix)));
        delete_all();
        println!(
            "round {round}: plain pods Ready {:.2} s, sidecar pods {:.2} s",
            plain.last().unwrap(),
            sidecar.last().unwrap()
        );
    }
    (plain, sidecar)
}
