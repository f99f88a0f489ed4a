//! Azure Key Vault: keybroker against the Secrets Store CSI Azure provider (v1.7.2, built from
//! its Go module by `scripts/install-peers.sh --bench`), both against the Entra ID + Key Vault
//! stand-in, in one run.
//!
//! The provider builds vault URLs without a port and talks to the public cloud's login host, so
//! the whole benchmark runs in a private network and mount namespace (entered before any
//! thread starts): loopback up, `/etc/hosts` bind-mounted to send `login.microsoftonline.com`
//! and `kv1.vault.azure.net` to 127.0.0.1, where the stand-in listens on port 443. Neither
//! keybroker nor the provider is changed or told anything but the stand-in's CA.
//!
//! Rows (10 objects per volume, workload identity federation, one identity):
//! - mount latency, interleaved rounds: keybroker cold (no token, nothing cached), keybroker
//!   warm (another pod of the identity already has a volume), the provider's `Mount` as the
//!   driver calls it;
//! - requests at the stand-in for 20 pods mounting, and per rotation cycle (the driver calls
//!   `Mount` again for every pod each poll; keybroker polls each object once);
//! - per hour for 100 pods × 10 objects at a 2-minute poll, from those counts;
//! - node memory: keybroker with 100 Azure volumes against keybroker with 100 local volumes of
//!   the same files, and the provider's RSS after 100 Mounts.
//!
//! Run (root): `scripts/install-peers.sh --bench && cargo bench --bench azure_publish`

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{pct, rss_mib};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::azure::AzureStandin;
use common::node::{Daemon, Pod, client};
use common::peers::{Issuer, TokenSpec};
use keybroker_csi::pb;
use keybroker_csi::provider_pb::{self, csi_driver_provider_client::CsiDriverProviderClient};
use serde_json::json;

const TENANT: &str = "72f988bf-0000-4000-8000-00000000c0de";
const APP: &str = "11111111-2222-4333-8444-555555555555";
const AUDIENCE: &str = "api://AzureADTokenExchange";
const OBJECTS: usize = 10;
const POLL_S: u64 = 2;
/// Added to every answer of the stand-in in the second latency table.
const LATENCY_MS: u64 = 5;

fn rounds() -> usize {
    std::env::var("KB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private network and mount namespace for this process and everything it starts.
fn private_network(dir: &Path) {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare (run as root)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    run(Command::new("ip").args(["link", "set", "lo", "up"]));
    std::fs::create_dir_all(dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost login.microsoftonline.com kv1.vault.azure.net\n::1 localhost\n",
    )
    .unwrap();
    mount(
        Some(&hosts),
        "/etc/hosts",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
}

fn objects_attr() -> String {
    let mut s = String::from("array:\n");
    for o in 0..OBJECTS {
        s.push_str(&format!(
            "  - |\n    objectName: obj-{o}\n    objectType: secret\n"
        ));
    }
    s
}

struct Bench {
    root: PathBuf,
    standin: AzureStandin,
    issuer: Issuer,
}

impl Bench {
    fn tokens(&self, pod: &Pod) -> String {
        self.issuer.kubelet_tokens(&[TokenSpec {
            ns: pod.ns,
            sa: pod.sa,
            pod: &pod.name,
            uid: &pod.uid,
            audience: AUDIENCE,
            expires_in: 3600,
        }])
    }

    fn publish(&self, pod: &Pod, provider: &str) -> pb::NodePublishVolumeRequest {
        let objects = objects_attr();
        let mut attrs = vec![("volumeType", "tmpfs")];
        match provider {
            "azure" => attrs.extend([
                ("keyvaultName", "kv1"),
                ("clientID", APP),
                ("objects", objects.as_str()),
            ]),
            _ => attrs.extend([("provider", "local"), ("objects", LOCAL_OBJECTS)]),
        }
        let mut req = pod.request_with(&self.root, &attrs, None);
        req.secrets = HashMap::from([(
            "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
            self.tokens(pod),
        )]);
        req
    }

    /// The driver's MountRequest for a pod, as Secrets Store CSI driver v1.x builds it.
    fn mount_request(&self, pod: &Pod) -> provider_pb::MountRequest {
        let attributes = json!({
            "keyvaultName": "kv1",
            "tenantId": TENANT,
            "clientID": APP,
            "usePodIdentity": "false",
            "useVMManagedIdentity": "false",
            "objects": objects_attr(),
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.ns,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.sa,
            "csi.storage.k8s.io/serviceAccount.tokens": self.tokens(pod),
        });
        let target = self.root.join("provider-targets").join(&pod.uid);
        std::fs::create_dir_all(&target).unwrap();
        provider_pb::MountRequest {
            attributes: attributes.to_string(),
            secrets: "{}".into(),
            target_path: target.display().to_string(),
            permission: "420".into(),
            current_object_version: vec![],
        }
    }

    async fn count(&self) -> (usize, usize) {
        let reqs = self.standin.requests().await;
        let exchanges = reqs.iter().filter(|r| r["kind"] == "entra").count();
        let kv = reqs.iter().filter(|r| r["kind"] == "keyvault").count();
        (exchanges, kv)
    }

    /// Requests since the last reset, and how many of them opened a new connection.
    async fn wire(&self) -> (usize, usize) {
        let reqs = self.standin.requests().await;
        let fresh = reqs.iter().filter(|r| r["newConn"] == true).count();
        (reqs.len(), fresh)
    }

    async fn reset(&self) {
        self.standin
            .admin(reqwest::Method::DELETE, "requests", json!(null))
            .await;
    }
}

const LOCAL_OBJECTS: &str = "- objectName: obj-0\n- objectName: obj-1\n- objectName: obj-2\n- objectName: obj-3\n- objectName: obj-4\n- objectName: obj-5\n- objectName: obj-6\n- objectName: obj-7\n- objectName: obj-8\n- objectName: obj-9\n";

struct Provider {
    child: Child,
    sock: PathBuf,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_provider(root: &Path, ca: &Path) -> Provider {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".peers/bench/secrets-store-csi-driver-provider-azure");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-peers.sh --bench",
        bin.display()
    );
    let sock = root.join("azure-provider.sock");
    let child = Command::new(bin)
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .env("SSL_CERT_FILE", ca)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("azure-provider.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the Azure provider did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Provider { child, sock }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root (namespaces, mounts)"
    );
    let base = std::env::temp_dir().join("kb-bench-azure");
    let _ = std::fs::remove_dir_all(&base);
    private_network(&base.join("net"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench(base));
}

async fn bench(base: PathBuf) {
    let root = base.join("kb");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let standin = AzureStandin::start(
        &base,
        &[
            "--https-port",
            "443",
            "--authority",
            "https://login.microsoftonline.com",
        ],
    );
    let mut issuer = Issuer::new(&base);
    issuer.serve_discovery(&base);
    let s = &standin;
    s.post("tenants", json!({"tenant": TENANT})).await;
    s.post("apps", json!({"tenant": TENANT, "clientId": APP, "federated": [
        {"issuer": issuer.iss, "subject": "system:serviceaccount:bench:app", "audiences": [AUDIENCE]}]}))
        .await;
    s.post(
        "vaults",
        json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read"}}),
    )
    .await;
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    for o in 0..OBJECTS {
        let value = format!("value-{o}-{}", "x".repeat(40));
        s.post(
            &format!("vaults/kv1/secrets/obj-{o}"),
            json!({"value": value}),
        )
        .await;
        std::fs::write(root.join(format!("secrets/obj-{o}")), &value).unwrap();
    }
    std::fs::write(
        root.join("etc/bindings.yaml"),
        format!(
            "bindings:\n  - name: azure\n    namespace: bench\n    serviceAccounts: [app]\n    identity: {{azure: {{tenantID: {TENANT}, clientID: {APP}, caFile: {}}}}}\n    objects: [\"secret/obj-*\"]\n  - name: local\n    namespace: bench-local\n    serviceAccounts: [app]\n    identity: {{local: {{path: {}}}}}\n    objects: [\"obj-*\"]\n",
            standin.ca().display(),
            root.join("secrets").display()
        ),
    )
    .unwrap();
    let b = Bench {
        root: root.clone(),
        standin,
        issuer,
    };
    let d = Daemon::start_opts(&root, &format!("{POLL_S}s"), &root.join("audit.jsonl"), &[]);
    let mut node = client(&d).await;
    let provider = start_provider(&base, &b.standin.ca());
    let mut prov =
        CsiDriverProviderClient::new(keybroker_csi::connect_unix(&provider.sock).await.unwrap());
    let v = prov
        .version(provider_pb::VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    println!(
        "Secrets Store CSI Azure provider: {} {}",
        v.runtime_name, v.runtime_version
    );

    // --- latency, interleaved: as the stand-in answers (one Python process: it serves one
    // request at a time), then with 5 ms added to every answer (a round trip and service time
    // of a real region), where requests that go out together overlap as at a real service.
    let n = rounds();
    latency(&b, &mut node, &mut prov, &root, &base, n, 0).await;
    b.standin
        .post("faults", json!({"latencyMs": LATENCY_MS}))
        .await;
    latency(&b, &mut node, &mut prov, &root, &base, n, 10_000).await;
    b.standin
        .admin(reqwest::Method::DELETE, "faults", json!(null))
        .await;

    // --- requests: 20 pods mounting, and per rotation cycle -------------------------------------
    b.reset().await;
    let pods: Vec<Pod> = (0..20)
        .map(|i| Pod::new("bench", "app", 2000 + i))
        .collect();
    for p in &pods {
        node.node_publish_volume(b.publish(p, "azure"))
            .await
            .unwrap();
    }
    let (kb_ex, kb_kv) = b.count().await;
    b.reset().await;
    let window = Duration::from_secs(POLL_S * 5);
    tokio::time::sleep(window).await;
    let (kb_cycle_ex, kb_cycle_kv) = b.count().await;
    let cycles = window.as_secs_f64() / POLL_S as f64;
    b.reset().await;
    for (i, _) in pods.iter().enumerate() {
        let p = Pod::new("bench", "app", 6000 + i);
        prov.mount(b.mount_request(&p)).await.unwrap();
    }
    let (pr_ex, pr_kv) = b.count().await;
    let pr_total = b.standin.requests().await.len();
    println!("\n## requests at the stand-in, 20 pods × 10 objects\n");
    println!("| | token requests | Key Vault requests | all requests |");
    println!("|---|---:|---:|---:|");
    println!(
        "| keybroker, 20 pods mounting | {kb_ex} | {kb_kv} | {} |",
        kb_ex + kb_kv
    );
    println!(
        "| keybroker, per rotation cycle ({cycles:.0} cycles of {POLL_S} s measured) | {:.1} | {:.1} | {:.1} |",
        kb_cycle_ex as f64 / cycles,
        kb_cycle_kv as f64 / cycles,
        (kb_cycle_ex + kb_cycle_kv) as f64 / cycles
    );
    println!(
        "| provider, 20 Mounts (= 20 pods mounting, and every rotation cycle) | {pr_ex} | {pr_kv} | {pr_total} |"
    );
    let per_mount = pr_total as f64 / 20.0;
    // keybroker's model: one GET per object per poll (the measured cycle rows show it, less
    // the cycles cut by the window) and one token refresh per hour.
    let kb_hour = OBJECTS as f64 * 30.0 + 1.0;
    let pr_hour = per_mount * 100.0 * 30.0;
    println!(
        "\nPer hour, 100 pods × 10 objects, 2-minute poll: keybroker {kb_hour:.0} requests (10 GETs per cycle × 30 + 1 token refresh), provider {pr_hour:.0} ({per_mount:.1} per Mount × 100 pods × 30): {:.0}× fewer.",
        pr_hour / kb_hour
    );
    for p in &pods {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
    }

    // --- memory: 100 Azure volumes against 100 local ones ------------------------------------
    let idle = rss_mib(d.child.as_ref().unwrap().id());
    let many: Vec<Pod> = (0..100)
        .map(|i| Pod::new("bench", "app", 3000 + i))
        .collect();
    for p in &many {
        node.node_publish_volume(b.publish(p, "azure"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let azure_rss = rss_mib(d.child.as_ref().unwrap().id());
    for p in &many {
        node.node_unpublish_volume(p.unpublish(&root))
            .await
            .unwrap();
    }
    drop(node);
    drop(d);
    let lroot = base.join("kb-local");
    std::fs::create_dir_all(lroot.join("etc")).unwrap();
    std::fs::copy(
        root.join("etc/bindings.yaml"),
        lroot.join("etc/bindings.yaml"),
    )
    .unwrap();
    let dl = Daemon::start_opts(
        &lroot,
        &format!("{POLL_S}s"),
        &lroot.join("audit.jsonl"),
        &[],
    );
    let mut lnode = client(&dl).await;
    let locals: Vec<Pod> = (0..100)
        .map(|i| Pod::new("bench-local", "app", 4000 + i))
        .collect();
    let lb = Bench {
        root: lroot.clone(),
        standin: b.standin,
        issuer: b.issuer,
    };
    for p in &locals {
        lnode
            .node_publish_volume(lb.publish(p, "local"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let local_rss = rss_mib(dl.child.as_ref().unwrap().id());
    for p in &locals {
        lnode
            .node_unpublish_volume(p.unpublish(&lroot))
            .await
            .unwrap();
    }
    for i in 0..80 {
        let p = Pod::new("bench", "app", 7000 + i);
        prov.mount(lb.mount_request(&p)).await.unwrap();
    }
    let provider_rss = rss_mib(provider.child.id());
    println!("\n## memory\n");
    println!("| process | RSS |");
    println!("|---|---:|");
    println!("| keybroker node, idle before the Azure volumes | {idle:.1} MiB |");
    println!("| keybroker node, 100 Azure volumes (10 objects each) | {azure_rss:.1} MiB |");
    println!("| keybroker node, 100 local volumes (the same files) | {local_rss:.1} MiB |");
    println!("| Secrets Store CSI Azure provider after 100+ Mounts | {provider_rss:.1} MiB |");
    println!(
        "\nAzure volumes cost {:+.1} MiB over local ones (goal: within 5 MiB).",
        azure_rss - local_rss
    );
}

/// One latency table: `n` rounds of a cold and a warm keybroker publish and a provider Mount,
/// interleaved; pods numbered from `first`.
async fn latency(
    b: &Bench,
    node: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    prov: &mut CsiDriverProviderClient<tonic::transport::Channel>,
    root: &Path,
    base: &Path,
    n: usize,
    first: usize,
) {
    let (mut cold, mut warm, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    // Requests and new connections (each a TCP + TLS handshake) at the stand-in, per cold
    // publish and per provider Mount, rounds after the first (the vault has been reached).
    let (mut cold_reqs, mut cold_conns, mut their_reqs, mut their_conns) = (0, 0, 0, 0);
    for r in 0..n {
        let a = Pod::new("bench", "app", first + 1000 + 2 * r);
        let w = Pod::new("bench", "app", first + 1001 + 2 * r);
        b.reset().await;
        let t = Instant::now();
        node.node_publish_volume(b.publish(&a, "azure"))
            .await
            .unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        if r > 0 {
            let (reqs, conns) = b.wire().await;
            cold_reqs += reqs;
            cold_conns += conns;
        }
        let t = Instant::now();
        node.node_publish_volume(b.publish(&w, "azure"))
            .await
            .unwrap();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
        node.node_unpublish_volume(w.unpublish(root)).await.unwrap();
        node.node_unpublish_volume(a.unpublish(root)).await.unwrap();
        let p = Pod::new("bench", "app", first + 5000 + r);
        let req = b.mount_request(&p);
        b.reset().await;
        let t = Instant::now();
        let resp = prov.mount(req).await.unwrap().into_inner();
        theirs.push(t.elapsed().as_secs_f64() * 1e3);
        if r > 0 {
            let (reqs, conns) = b.wire().await;
            their_reqs += reqs;
            their_conns += conns;
        }
        assert!(
            resp.error.as_ref().is_none_or(|e| e.code.is_empty()),
            "the provider's Mount failed: {:?}\n{}",
            resp.error,
            std::fs::read_to_string(base.join("azure-provider.log")).unwrap_or_default()
        );
        assert_eq!(resp.object_version.len(), OBJECTS);
    }
    let added = if first == 0 {
        String::from("as the stand-in answers")
    } else {
        format!("{LATENCY_MS} ms added to every answer")
    };
    println!("\n## mount latency, 10 objects, {n} rounds interleaved, {added}\n");
    println!("| variant | p50 | p99 | p50 ratio to the provider |");
    println!("|---|---:|---:|---:|");
    let base50 = pct(&mut theirs, 0.5);
    for (name, v) in [
        (
            "Secrets Store CSI Azure provider v1.7.2, Mount",
            &mut theirs,
        ),
        (
            "keybroker publish, cold (token exchange + 10 GETs)",
            &mut cold,
        ),
        (
            "keybroker publish, warm (identity's token and values cached)",
            &mut warm,
        ),
    ] {
        let p50 = pct(v, 0.5);
        println!(
            "| {name} | {p50:.2} ms | {:.2} ms | {:.3}× |",
            pct(v, 0.99),
            p50 / base50
        );
    }
    let per = |x: usize| x as f64 / (n.max(2) - 1) as f64;
    println!("\n| per call, rounds 2..{n} | requests at the stand-in | new TLS connections |");
    println!("|---|---:|---:|");
    println!(
        "| keybroker cold publish | {:.1} | {:.2} |",
        per(cold_reqs),
        per(cold_conns)
    );
    println!(
        "| provider Mount | {:.1} | {:.2} |",
        per(their_reqs),
        per(their_conns)
    );
}
