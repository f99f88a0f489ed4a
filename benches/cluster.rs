//! keybroker in a real cluster (issue #22): the cluster of `scripts/cluster.sh`, the chart
//! installed with the locally built image, then
//! - pod start: 20 busybox pods created at once, from `kubectl apply` to all 20 Ready, with an
//!   `emptyDir` volume (the baseline, same run), a keybroker tmpfs volume, a FUSE volume;
//!   rounds alternate so a slow moment of the machine hits every kind;
//! - a source change to the new value inside a pod (a pod notes the time it first reads it);
//! - the keybroker pod's memory (its cgroup: usage less inactive file cache, and keybroker's
//!   resident memory) with 0, 20 and 100 pods holding a volume each (half tmpfs, half FUSE);
//! - the cluster's own costs: up, helm install, down.
//!
//! Run (root, after `scripts/cluster.sh build` and `scripts/build-image.sh`):
//! `cargo bench --bench cluster` (`KB_ROUNDS=3` rounds of each kind by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::pct;
use common::cluster::*;

const PODS: usize = 20;
const NS: &str = "bench";

/// `n` pods named `{prefix}-{i}`, each with one volume of `kind` (`emptydir`, `tmpfs`, `fuse`)
/// at /v, as one `kind: List`.
fn pods(prefix: &str, kind: &str, n: usize, script: &str) -> String {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let volume = match kind {
                "emptydir" => serde_json::json!({"name": "v", "emptyDir": {"medium": "Memory"}}),
                k => csi_volume("v", k, "- objectName: password\n  object: db\n"),
            };
            serde_json::from_str(&pod(&format!("{prefix}-{i}"), NS, "app", script, &[volume]))
                .unwrap()
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Pods of the namespace that are Ready, and all of them.
fn ready_of(prefix: &str) -> (usize, usize) {
    let out = kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ])
    .1;
    let mine: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .collect();
    (
        mine.iter().filter(|l| l.ends_with(" True")).count(),
        mine.len(),
    )
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

/// Seconds from `kubectl apply` of `n` pods to all of them Ready.
fn start_pods(prefix: &str, kind: &str, n: usize) -> f64 {
    let start = Instant::now();
    apply(&pods(prefix, kind, n, "sleep 3600"));
    eventually(&format!("{n} {kind} pods Ready"), || {
        ready_of(prefix).0 == n
    });
    start.elapsed().as_secs_f64()
}

/// The keybroker pod's memory: (cgroup usage less inactive file, MiB; keybroker's VmRSS, MiB).
fn node_memory() -> (f64, f64) {
    let (pod_name, _) = one_ready_node_pod("the keybroker pod", |_, _| true);
    let uid = get("kube-system", "pod", &pod_name, "{.metadata.uid}");
    let dir = ["besteffort", "burstable", "guaranteed"]
        .iter()
        .map(|q| format!("/sys/fs/cgroup/memory/kubepods/{q}/pod{uid}"))
        .chain(std::iter::once(format!(
            "/sys/fs/cgroup/memory/kubepods/pod{uid}"
        )))
        .find(|d| std::path::Path::new(d).exists())
        .expect("the keybroker pod's memory cgroup");
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
    let container = container_id("kube-system", &pod_name, "keybroker");
    let pid = container_process(&container, &["keybroker", "node"]).expect("keybroker's pid");
    ((usage - inactive) / 1048576.0, common::bench::rss_mib(pid))
}

fn main() {
    common::require_root_and_fuse();
    let rounds: usize = std::env::var("KB_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (repository, tag) = image_reference();
    let tmp = common::open_tempdir();
    let secrets = tmp.path().join("dev-secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("db"), "bench-v0").unwrap();
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n\
             bindings: |\n  bindings:\n    - name: bench\n      namespace: {NS}\n      serviceAccounts: [app]\n      identity: {{local: {{path: /dev-secrets}}}}\n      objects: [db]\n\
             extraVolumes:\n  - {{name: dev-secrets, hostPath: {{path: {}, type: Directory}}}}\n\
             extraVolumeMounts:\n  - {{name: dev-secrets, mountPath: /dev-secrets, readOnly: true}}\n\
             pollInterval: 2s\n\
             auditDir: {}\n\
             stateDir: /var/lib/kubelet/keybroker-state\n",
            secrets.display(),
            tmp.path().join("audit").display()
        ),
    )
    .unwrap();

    let t = Instant::now();
    let cluster = Cluster::up();
    let up = t.elapsed().as_secs_f64();
    let t = Instant::now();
    helm("install", &values, &[]);
    one_ready_node_pod("keybroker Ready", |_, _| true);
    let install = t.elapsed().as_secs_f64();
    must(&["create", "namespace", NS]);
    must(&["create", "serviceaccount", "-n", NS, "app"]);
    let idle = node_memory();

    // Pod start, rounds alternating the kinds.
    let kinds = ["emptydir", "tmpfs", "fuse"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            let s = start_pods(&format!("{kind}-r{round}"), kind, PODS);
            times[k].push(s);
            println!("round {round}: {PODS} pods with {kind:<8} Ready in {s:.2} s");
            delete_all();
        }
    }
    let med: Vec<f64> = times.iter_mut().map(|v| pct(v, 0.5)).collect();

    // Memory with 20 and 100 pods holding a volume each (half tmpfs, half FUSE).
    let mut memory = vec![(0usize, idle)];
    for n in [20usize, 100] {
        apply(&pods("mt", "tmpfs", n / 2, "sleep 3600"));
        apply(&pods("mf", "fuse", n / 2, "sleep 3600"));
        eventually(&format!("{n} pods Ready"), || {
            ready_of("mt").0 + ready_of("mf").0 == n
        });
        std::thread::sleep(Duration::from_secs(3));
        memory.push((n, node_memory()));
        delete_all();
    }

    // A source change to the value in a pod: the pod writes the time it first reads it.
    let watcher = r#"last=; while :; do v=; read -r v < /v/password
if [ "$v" != "$last" ]; then echo "SEEN $v ${EPOCHREALTIME/./}"; last=$v; fi; usleep 10000; done"#;
    apply(&pods("watch-t", "tmpfs", 1, watcher));
    apply(&pods("watch-f", "fuse", 1, watcher));
    eventually("the watchers Ready", || {
        ready_of("watch-t").0 + ready_of("watch-f").0 == 2
    });
    let mut delays: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    for i in 1..=5 {
        std::thread::sleep(Duration::from_millis(2500));
        let value = format!("bench-v{i}");
        let t0 = micros_now();
        std::fs::write(secrets.join("db"), &value).unwrap();
        for (k, name) in ["watch-t-0", "watch-f-0"].iter().enumerate() {
            let mut seen = 0u64;
            eventually(&format!("{name} sees {value}"), || {
                seen = kubectl(&["logs", "-n", NS, name])
                    .1
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("SEEN {value} ")))
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                seen > 0
            });
            delays[k].push(seen.saturating_sub(t0) as f64 / 1000.0);
        }
    }
    delete_all();
    uninstall();
    let t = Instant::now();
    drop(cluster);
    let down = t.elapsed().as_secs_f64();

    println!();
    println!("pod start, {PODS} pods at once, apply to all Ready ({rounds} rounds, median):");
    for (k, kind) in kinds.iter().enumerate() {
        println!(
            "  {kind:<8} {:>6.2} s  {:>5.2}x emptyDir   (rounds: {:?})",
            med[k],
            med[k] / med[0],
            times[k]
                .iter()
                .map(|t| (t * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
    println!("source change to the new value in the pod (poll interval 2 s), ms:");
    for (k, kind) in ["tmpfs", "fuse"].iter().enumerate() {
        let v = &mut delays[k];
        println!(
            "  {kind:<8} median {:>7.1}  max {:>7.1}",
            pct(v, 0.5),
            pct(v, 1.0)
        );
    }
    println!("keybroker pod memory (cgroup, less inactive file / keybroker VmRSS), MiB:");
    for (n, (cg, rss)) in memory {
        println!("  {n:>3} pods  {cg:>7.1}  /  {rss:>6.1}");
    }
    println!("cluster: up {up:.1} s, helm install to Ready {install:.1} s, down {down:.1} s");
}
