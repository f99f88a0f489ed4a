//! What hostile volume attributes cost the node (issue #9), and what the hardening costs an
//! ordinary publish. `keybroker node` (release) is driven over its CSI socket as kubelet does.
//!
//! For each hostile input: the time until the node refuses it, the node's peak RSS, and
//! whether the node survived. Then 8 hostile publishes at once beside an ordinary one. Then
//! the normal path: sequential publishes of a volume of 10 cached objects (p50/p99).
//!
//! With `KB_BASELINE_BIN=/path/to/older/keybroker`, the same rows are measured for that binary
//! too, in the same run (rows interleaved), as the before/after comparison.
//!
//! Run (root): `KB_BASELINE_BIN=... cargo bench --bench hostile_publish`
//! (`KB_BENCH_ONLY=normal` runs only the normal-path rows.)
#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::pct;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keybroker_csi::pb;
use keybroker_csi::pb::node_client::NodeClient;

struct Node {
    child: Child,
    root: PathBuf,
    sock: PathBuf,
}

fn state_dir(root: &Path) -> PathBuf {
    Path::new("/dev/shm/kb-bench-hostile-state").join(root.file_name().unwrap())
}

impl Node {
    fn start(bin: &str, root: &Path) -> Node {
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(state_dir(root));
        std::fs::create_dir_all(root.join("secrets")).unwrap();
        for o in 0..10 {
            std::fs::write(root.join(format!("secrets/obj{o}")), format!("value-{o}")).unwrap();
        }
        std::fs::write(
            root.join("secrets/big"),
            format!(r#"{{"k":"{}"}}"#, "x".repeat(1000 << 10)),
        )
        .unwrap();
        std::fs::write(
            root.join("bindings.yaml"),
            format!(
                "bindings:\n  - name: b\n    namespace: bench\n    serviceAccounts: [app]\n    identity: {{local: {{path: {}}}}}\n    objects: [\"obj*\", big]\n",
                root.join("secrets").display()
            ),
        )
        .unwrap();
        let sock = root.join("csi.sock");
        let child = Command::new(bin)
            .args([
                "node",
                "--node-id",
                "bench",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--bindings")
            .arg(root.join("bindings.yaml"))
            // On a node the state directory is /run/keybroker, a tmpfs; /dev/shm is one here.
            .arg("--state-dir")
            .arg(state_dir(root))
            .arg("--audit-log")
            .arg(root.join("audit.jsonl"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "node did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Node {
            child,
            root: root.to_owned(),
            sock,
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn peak_rss_mib(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The fd keeper the node started outlives it by design.
        let _ =
            keybroker::keeper::KeeperClient::new(&state_dir(&self.root).join("keeper.sock")).quit();
        // Unmount whatever the node left (it was killed), the tmpfs staging mounts (under its
        // state directory) included, then remove the state.
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            for l in mi.lines() {
                if let Some(mp) = l.split(' ').nth(4)
                    && (Path::new(mp).starts_with(&self.root)
                        || Path::new(mp).starts_with(state_dir(&self.root)))
                {
                    let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        let _ = std::fs::remove_dir_all(state_dir(&self.root));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn request(root: &Path, i: usize, objects: &str) -> pb::NodePublishVolumeRequest {
    let uid = format!("00000000-0000-0000-0000-{i:012}");
    common::bench::publish_request(
        root,
        &format!("p-{i}"),
        &uid,
        &[
            ("provider", "local".into()),
            ("volumeType", "tmpfs".into()),
            ("objects", objects.into()),
        ],
        HashMap::new(),
    )
}

fn hostile() -> Vec<(&'static str, String)> {
    vec![
        (
            "flow sequence nested 60,000 deep in filePermission (120 KB)",
            format!(
                "- objectName: obj0\n  filePermission: {}{}\n",
                "[".repeat(60_000),
                "]".repeat(60_000)
            ),
        ),
        (
            "flow sequence nested 120,000 deep (240 KB)",
            format!(
                "- objectName: obj0\n  filePermission: {}{}\n",
                "[".repeat(120_000),
                "]".repeat(120_000)
            ),
        ),
        (
            "7.5 KB of flow sequences 31 deep (parsed inline, under 8 KiB)",
            format!(
                "- objectName: obj0\n  filePermission: [{}]\n",
                vec![format!("{}{}", "[".repeat(30), "]".repeat(30)); 120].join(",")
            ),
        ),
        (
            "7.5 KB of YAML aliases, 9 levels of 9 (to the blocking pool)",
            {
                let mut y = String::from(
                    "- objectName: obj0\n  filePermission:\n    l0: &l0 [x,x,x,x,x,x,x,x,x]\n",
                );
                for i in 1..9 {
                    let refs = vec![format!("*l{}", i - 1); 9].join(",");
                    y.push_str(&format!("    l{i}: &l{i} [{refs}]\n"));
                }
                while y.len() < 7_500 {
                    y.push_str("    # padding to the inline limit\n");
                }
                y
            },
        ),
        (
            "template with 1,000 references to a 1000 KiB key",
            format!(
                "- objectName: f\n  object: big\n  template: \"{}\"\n",
                "{{k}}".repeat(1000)
            ),
        ),
        (
            "template with 4,000 references to a 1000 KiB key (20 KB)",
            format!(
                "- objectName: f\n  object: big\n  template: \"{}\"\n",
                "{{k}}".repeat(4000)
            ),
        ),
    ]
}

const ORDINARY: &str = "- objectName: file0\n  object: obj0\n- objectName: file1\n  object: obj1\n- objectName: file2\n  object: obj2\n- objectName: file3\n  object: obj3\n- objectName: file4\n  object: obj4\n- objectName: file5\n  object: obj5\n- objectName: file6\n  object: obj6\n- objectName: file7\n  object: obj7\n- objectName: file8\n  object: obj8\n- objectName: file9\n  object: obj9\n";

async fn client(n: &Node) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(keybroker_csi::connect_unix(&n.sock).await.unwrap())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(nix::unistd::geteuid().is_root(), "run as root (mounts)");
    let current = env!("CARGO_BIN_EXE_keybroker").to_owned();
    let mut bins = vec![("current", current)];
    if let Ok(b) = std::env::var("KB_BASELINE_BIN") {
        bins.insert(0, ("baseline", b));
    }
    let base = std::env::temp_dir().join("kb-bench-hostile");

    let only_normal = std::env::var("KB_BENCH_ONLY").is_ok_and(|v| v == "normal");
    if !only_normal {
        hostile_rows(&bins, &base).await;
    }
    normal_rows(&bins, &base).await;
    render_row();
    let _ = std::fs::remove_dir("/dev/shm/kb-bench-hostile-state");
}

async fn hostile_rows(bins: &[(&str, String)], base: &Path) {
    println!("## refusing one hostile publish (fresh node each)\n");
    println!("| input | binary | answer | time | node peak RSS | node alive |");
    println!("|---|---|---|---:|---:|---|");
    for (what, objects) in hostile() {
        for (name, bin) in bins {
            let mut n = Node::start(bin, &base.join(name));
            let mut c = client(&n).await;
            let t = Instant::now();
            let res = tokio::time::timeout(
                Duration::from_secs(60),
                c.node_publish_volume(request(&n.root, 1, &objects)),
            )
            .await;
            let took = t.elapsed();
            let answer = match res {
                Err(_) => "no answer in 60 s".to_string(),
                Ok(Ok(_)) => "accepted".into(),
                Ok(Err(s)) => format!("{:?}", s.code()),
            };
            std::thread::sleep(Duration::from_millis(100));
            let rss = n.peak_rss_mib();
            let alive = n.alive();
            println!(
                "| {what} | {name} | {answer} | {:.1} ms | {rss:.1} MiB | {} |",
                took.as_secs_f64() * 1e3,
                if alive { "yes" } else { "**no (crashed)**" }
            );
        }
    }

    println!("\n## an ordinary publish while 8 hostile ones run\n");
    println!("| binary | ordinary publish | node peak RSS | node alive |");
    println!("|---|---:|---:|---|");
    for (name, bin) in bins {
        let mut n = Node::start(bin, &base.join(name));
        let inputs = hostile();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut c = client(&n).await;
            let req = request(&n.root, 100 + i, &inputs[i % inputs.len()].1);
            tasks.push(tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(90), c.node_publish_volume(req)).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut c = client(&n).await;
        let t = Instant::now();
        let ok = tokio::time::timeout(
            Duration::from_secs(90),
            c.node_publish_volume(request(&n.root, 1, ORDINARY)),
        )
        .await;
        let took = t.elapsed();
        for t in tasks {
            let _ = t.await;
        }
        let ordinary = match ok {
            Ok(Ok(_)) => format!("{:.1} ms", took.as_secs_f64() * 1e3),
            Ok(Err(s)) => format!(
                "failed ({:?}) after {:.1} ms",
                s.code(),
                took.as_secs_f64() * 1e3
            ),
            Err(_) => "no answer in 90 s".into(),
        };
        let rss = n.peak_rss_mib();
        let alive = n.alive();
        println!(
            "| {name} | {ordinary} | {rss:.1} MiB | {} |",
            if alive { "yes" } else { "**no (crashed)**" }
        );
    }
}

async fn normal_rows(bins: &[(&str, String)], base: &Path) {
    let rounds: usize = std::env::var("KB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!(
        "\n## the normal path: publish + unpublish of 10 cached objects, {rounds} rounds, interleaved\n"
    );
    let mut nodes = Vec::new();
    for (name, bin) in bins {
        let n = Node::start(bin, &base.join(format!("{name}-normal")));
        let mut c = client(&n).await;
        // Warm the cache.
        let warm = request(&n.root, 0, ORDINARY);
        c.node_publish_volume(warm.clone()).await.unwrap();
        nodes.push((name, n, c, Vec::new()));
    }
    for r in 0..rounds {
        for (_, n, c, samples) in nodes.iter_mut() {
            let req = request(&n.root, 1000 + r, ORDINARY);
            let t = Instant::now();
            c.node_publish_volume(req.clone()).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            c.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: req.volume_id,
                target_path: req.target_path,
            })
            .await
            .unwrap();
        }
    }
    println!("| binary | publish p50 | publish p99 | p50 ratio to the first row |");
    println!("|---|---:|---:|---:|");
    let mut first = None;
    for (name, _, _, samples) in nodes.iter_mut() {
        let p50 = pct(samples, 0.5);
        let p99 = pct(samples, 0.99);
        let f = *first.get_or_insert(p50);
        println!("| {name} | {p50:.3} ms | {p99:.3} ms | {:.2}× |", p50 / f);
    }
}

/// The render step alone, in-process: the ordinary volume's 10 files from 10 cached objects,
/// with the limits checked while rendering. Shows what share of a publish the limit checks
/// can be.
fn render_row() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    let ctx: BTreeMap<String, String> = [
        ("csi.storage.k8s.io/pod.name", "p"),
        ("csi.storage.k8s.io/pod.namespace", "bench"),
        ("csi.storage.k8s.io/pod.uid", "u"),
        ("csi.storage.k8s.io/serviceAccount.name", "app"),
        ("provider", "local"),
        ("objects", ORDINARY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let vr = keybroker::node::request::parse(
        &ctx,
        &Default::default(),
        keybroker::volume::VolumeKind::Fuse,
        Default::default(),
    )
    .unwrap();
    let objects: BTreeMap<_, _> = vr
        .content
        .objects()
        .into_iter()
        .map(|o| {
            let value = format!("value of {} ({})", o.name, "x".repeat(40));
            let obj = keybroker::secret::SecretObject {
                value: keybroker::secret::SecretBytes::new(value.into_bytes()),
                version: "1".into(),
                content_type: None,
                expiry: None,
                lease: None,
            };
            (o, Arc::new(obj))
        })
        .collect();
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(vr.content.render(&objects).unwrap());
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "\nrender of the ordinary volume in-process (10 files, limits checked while rendering): {per:.2} µs per render ({n} renders)"
    );
}
