//! The node at scale (issue #11): a fresh `keybroker node` per row publishes N volumes of one
//! type over its CSI socket (16 at a time, as kubelet's workers would), each reading 10 cached
//! objects; then every volume is unpublished. Per row: publish latency, the daemon's resident
//! memory and threads with the volumes published and after they are all gone. The baseline is
//! the same daemon idle, measured in the same row.
//!
//! With `KB_BASELINE_BIN=/path/to/older/keybroker` the same rows run for that binary too (the
//! FUSE server before sessions were multiplexed: a thread pool per volume).
//!
//! The node starts its fd keeper (`--fd-keeper auto`): its resident memory with every FUSE
//! session held is the last column (a baseline binary without one shows `-`).
//!
//! Run (root): `cargo bench --bench node_scale` (`KB_SCALE=100,1000` by default).

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{local_volume as request, pct, status_kib, unpublish};

use std::path::Path;

use std::time::{Duration, Instant};

struct Row {
    idle: (f64, f64),
    published: (f64, f64),
    after: (f64, f64),
    p50: f64,
    p99: f64,
    /// The fd keeper's RSS (MiB) with the volumes published.
    keeper: Option<f64>,
}

/// The pid of the keeper serving `socket` (found by its command line).
fn keeper_pid(socket: &Path) -> Option<u32> {
    let want = socket.to_str()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("fd-keeper") && cmd.contains(want)).then_some(pid)
    })
}

fn mem(pid: u32) -> (f64, f64) {
    (
        status_kib(pid, "VmRSS:") / 1024.0,
        status_kib(pid, "Threads:"),
    )
}

async fn row(bin: &str, root: &Path, kind: &str, n: usize) -> Row {
    let _ = std::fs::remove_dir_all(root);
    let (mut child, node) = common::bench::start_local_node(bin, root, "127.0.0.1:0").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = mem(child.id());
    let reqs: Vec<_> = (0..n).map(|i| request(root, i, kind)).collect();
    let mut lat = Vec::with_capacity(n);
    for chunk in reqs.chunks(16) {
        let mut tasks = Vec::new();
        for r in chunk {
            let (mut c, r) = (node.clone(), r.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                c.node_publish_volume(r).await.unwrap();
                t.elapsed().as_secs_f64()
            }));
        }
        for t in tasks {
            lat.push(t.await.unwrap());
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published = mem(child.id());
    let keeper_sock = root.join("state/keeper.sock");
    let keeper = keeper_pid(&keeper_sock).map(|p| mem(p).0);
    for chunk in reqs.chunks(16) {
        let mut tasks = Vec::new();
        for r in chunk {
            let mut c = node.clone();
            let u = unpublish(r);
            tasks.push(tokio::spawn(async move {
                c.node_unpublish_volume(u).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = mem(child.id());
    let _ = child.kill();
    let _ = child.wait();
    common::node::detach_mounts_under(root);
    let _ = keybroker::keeper::KeeperClient::new(&keeper_sock).quit();
    Row {
        idle,
        published,
        after,
        p50: pct(&mut lat, 0.5) * 1e3,
        p99: pct(&mut lat, 0.99) * 1e3,
        keeper,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the benchmark mounts volumes"
    );
    let sizes: Vec<usize> = std::env::var("KB_SCALE")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut bins = vec![("keybroker", common::BIN.to_string())];
    if let Ok(b) = std::env::var("KB_BASELINE_BIN") {
        bins.push(("baseline", b));
    }
    println!(
        "| binary | type | volumes | publish p50 | p99 | RSS idle | RSS published | RSS after unpublish | threads idle | published | after | fd keeper RSS |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in &sizes {
        for kind in ["tmpfs", "fuse"] {
            for (name, bin) in &bins {
                let r = row(bin, &tmp.path().join("row"), kind, *n).await;
                println!(
                    "| {name} | {kind} | {n} | {:.2} ms | {:.2} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} |",
                    r.p50,
                    r.p99,
                    r.idle.0,
                    r.published.0,
                    r.after.0,
                    r.idle.1,
                    r.published.1,
                    r.after.1,
                    r.keeper.map_or("-".into(), |k| format!("{k:.1} MiB"))
                );
            }
        }
    }
}
