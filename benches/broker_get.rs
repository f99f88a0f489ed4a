//! The broker API (`keybroker.v1.Broker`) on a warm cache, over its unix socket as an
//! application calls it: `Get` latency next to the gRPC floor measured in the same run (a `Get`
//! of a name the volume does not hold: same socket, same admission, no value, no audit record),
//! and the memory the API adds to an idle sidecar (same config, without and with the socket).
//!
//! Run (root): `cargo bench --bench broker_get`

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{pct, status_kib};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keybroker_csi::broker_pb::{self as pb, broker_client::BrokerClient};

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(dir: &Path, name: &str, api: Option<&Path>) -> Sidecar {
    let mut c = Command::new(common::BIN);
    c.args(["sidecar", "--config"])
        .arg(dir.join("config.yaml"))
        .arg("--dir")
        .arg(dir.join(name))
        .args(["--api-uid", "0", "--health-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap());
    if let Some(s) = api {
        c.arg("--api-socket").arg(s);
    }
    let s = Sidecar(c.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(dir.join(name).join("..data").exists() && api.is_none_or(|s| s.exists())) {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not start: {}",
            std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::var("KB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let tmp = common::open_tempdir();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    let mut cfg = format!(
        "provider: {{local: {{path: {}}}}}\nvolume: {{pollInterval: 2s}}\naudit: {{path: {}}}\nfiles:\n",
        d.join("secrets").display(),
        d.join("audit.jsonl").display()
    );
    for i in 0..10 {
        std::fs::write(
            d.join(format!("secrets/db{i}")),
            format!(r#"{{"password":"bench-value-{i}-{}"}}"#, "x".repeat(48)),
        )
        .unwrap();
        cfg.push_str(&format!(
            "  - {{name: p{i}, object: db{i}, key: password}}\n"
        ));
    }
    std::fs::write(d.join("config.yaml"), cfg).unwrap();

    // Memory: the same sidecar without and with the API (after the Gets below), both idle.
    let plain = sidecar(d, "plain", None);
    let sock = d.join("api.sock");
    let api = sidecar(d, "api", Some(&sock));
    let mut c = BrokerClient::new(keybroker_csi::connect_unix(&sock).await.unwrap());
    let (mut get, mut floor) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 100 {
        let name = format!("p{}", i % 10);
        let t = Instant::now();
        let v = c.get(pb::GetRequest { name }).await.unwrap().into_inner();
        let g = t.elapsed().as_secs_f64() * 1e3;
        assert!(!v.value.is_empty());
        let t = Instant::now();
        let e = c
            .get(pb::GetRequest {
                name: "absent".into(),
            })
            .await
            .unwrap_err();
        let f = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(e.code(), tonic::Code::NotFound);
        if i >= 100 {
            get.push(g);
            floor.push(f);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (fp50, fp99) = (pct(&mut floor, 0.5), pct(&mut floor, 0.99));
    let (gp50, gp99) = (pct(&mut get, 0.5), pct(&mut get, 0.99));
    println!("## broker Get, 10 files of 64 bytes, warm ({n} rounds, interleaved)\n");
    println!("| call | p50 | p99 | p50 ratio to the floor |");
    println!("|---|---:|---:|---:|");
    println!("| Get of an absent name (floor) | {fp50:.3} ms | {fp99:.3} ms | 1.00× |");
    println!(
        "| Get | {gp50:.3} ms | {gp99:.3} ms | {:.2}× |",
        gp50 / fp50
    );
    println!("\n## memory (idle, 3 s after the last call)\n");
    println!("| sidecar | VmRSS | RssAnon | threads |");
    println!("|---|---:|---:|---:|");
    for (what, p) in [
        ("without the broker API", &plain),
        ("with the broker API, after the Gets", &api),
    ] {
        let pid = p.0.id();
        println!(
            "| {what} | {:.1} MiB | {:.1} MiB | {} |",
            status_kib(pid, "VmRSS:") / 1024.0,
            status_kib(pid, "RssAnon:") / 1024.0,
            status_kib(pid, "Threads:")
        );
    }
    drop(c);
}
