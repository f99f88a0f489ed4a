//! NodePublishVolume latency and daemon memory (issue #3), driving `keybroker node` over its
//! CSI socket as kubelet does. Volumes of one identity read 10 objects that are already in the
//! node cache (the first volume warms it). Baseline, measured in the same run: what kubelet
//! does for a Secret volume (mount a tmpfs, write 10 files, unmount).
//!
//! Run (root): `cargo bench --bench node_publish`
#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{local_volume as request, pct, rss_mib, unpublish};

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};

/// Sequential publishes per row (KB_BENCH_N overrides, for quick runs).
fn sequential() -> usize {
    std::env::var("KB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
const CONCURRENT: usize = 100;

/// kubelet's Secret volume, as the baseline: tmpfs mount, 10 files written, unmount.
fn kubelet_style_secret_volume(dir: &Path) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let t = Instant::now();
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m"),
    )
    .unwrap();
    for o in 0..10 {
        let mut f = std::fs::File::create(dir.join(format!("file{o}"))).unwrap();
        f.write_all(format!("value-{o}-{}", "x".repeat(100)).as_bytes())
            .unwrap();
    }
    let mount_write = t.elapsed().as_secs_f64();
    nix::mount::umount2(dir, MntFlags::MNT_DETACH).unwrap();
    mount_write
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the benchmark mounts volumes"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = env!("CARGO_BIN_EXE_keybroker");
    let (mut child, mut node) =
        common::bench::start_local_node(bin, root, &format!("127.0.0.1:{port}")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_mib(child.id());

    // Warm the node cache with one volume.
    let warm = request(root, 0, "fuse");
    node.node_publish_volume(warm.clone()).await.unwrap();

    let mut baseline = Vec::new();
    let mut lat: HashMap<&str, Vec<f64>> = HashMap::new();
    let sequential = sequential();
    for i in 0..sequential {
        for kind in ["fuse", "tmpfs"] {
            let r = request(root, 10_000 + i * 2 + usize::from(kind == "tmpfs"), kind);
            let t = Instant::now();
            node.node_publish_volume(r.clone()).await.unwrap();
            lat.entry(kind).or_default().push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            node.node_unpublish_volume(unpublish(&r)).await.unwrap();
            lat.entry(if kind == "fuse" {
                "unpublish-fuse"
            } else {
                "unpublish-tmpfs"
            })
            .or_default()
            .push(t.elapsed().as_secs_f64());
        }
        baseline.push(kubelet_style_secret_volume(&root.join("baseline")));
        let t = Instant::now();
        node.node_publish_volume(warm.clone()).await.unwrap();
        lat.entry("republish")
            .or_default()
            .push(t.elapsed().as_secs_f64());
    }
    let base_p50 = pct(&mut baseline, 0.5);
    println!(
        "NodePublishVolume, 10 cached objects, {sequential} sequential publishes per row (each unpublished after):"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "p50 ratio"
    );
    println!(
        "{:<44} {:>9.3} {:>9.3} {:>8.1}x",
        "baseline: kubelet-style tmpfs + 10 writes",
        base_p50 * 1e3,
        pct(&mut baseline, 0.99) * 1e3,
        1.0
    );
    for (name, key) in [
        ("keybroker publish, FUSE", "fuse"),
        ("keybroker publish, tmpfs", "tmpfs"),
        ("keybroker republish (healthy volume)", "republish"),
        ("keybroker unpublish, FUSE", "unpublish-fuse"),
        ("keybroker unpublish, tmpfs", "unpublish-tmpfs"),
    ] {
        let v = lat.get_mut(key).unwrap();
        let p50 = pct(v, 0.5);
        println!(
            "{name:<44} {:>9.3} {:>9.3} {:>8.1}x",
            p50 * 1e3,
            pct(v, 0.99) * 1e3,
            p50 / base_p50
        );
    }

    // 100 volumes at once: latency under concurrency and resident memory.
    let reqs: Vec<_> = (0..CONCURRENT)
        .map(|i| request(root, 50_000 + i, if i % 2 == 0 { "fuse" } else { "tmpfs" }))
        .collect();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for r in &reqs {
        let mut n = node.clone();
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            n.node_publish_volume(r).await.unwrap();
            t.elapsed().as_secs_f64()
        }));
    }
    let mut conc = Vec::new();
    for t in tasks {
        conc.push(t.await.unwrap());
    }
    let wall = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss100 = rss_mib(child.id());
    println!(
        "{CONCURRENT} concurrent publishes (half FUSE, half tmpfs): p50 {:.2} ms, p99 {:.2} ms, all done in {:.0} ms",
        pct(&mut conc, 0.5) * 1e3,
        pct(&mut conc, 0.99) * 1e3,
        wall * 1e3
    );
    println!(
        "daemon RSS: idle {idle_rss:.1} MiB; with {} volumes {rss100:.1} MiB",
        CONCURRENT + 1
    );
    let metrics = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let fetches = metrics
        .lines()
        .find(|l| l.starts_with("keybroker_provider_fetches_total "))
        .unwrap_or("");
    println!("provider fetches for all of the above: {fetches}");

    for r in &reqs {
        node.node_unpublish_volume(unpublish(r)).await.unwrap();
    }
    node.node_unpublish_volume(unpublish(&warm)).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    // The fd keeper the node started outlives it by design.
    let _ = keybroker::keeper::KeeperClient::new(&root.join("state/keeper.sock")).quit();
}
