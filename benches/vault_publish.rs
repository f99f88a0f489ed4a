//! Vault mount latency and Vault load (issue #4), against a real OpenBao started here.
//!
//! - Mount latency for a volume of 10 KV objects, cold (no token, nothing cached: the identity's
//!   previous volume was unpublished, so keybroker logged out) and warm (another pod of the
//!   identity has a volume: token and values cached).
//! - Baseline in the same run: the per-pod model of the Vault CSI provider, i.e. what each mount
//!   costs when nothing is shared (a login with the pod's token plus 10 reads, one after the
//!   other), done with a plain HTTP client against the same OpenBao.
//! - Vault requests for 100 volumes × 10 objects, counted in OpenBao's audit log over a
//!   measured window and scaled to one hour at the default 2-minute poll, against the per-pod
//!   model (every pod logs in and reads every object at every poll).
//!
//! Run (root, after scripts/install-peers.sh): `cargo bench --bench vault_publish`

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::pct;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::bench::unpublish;
use common::node::{Daemon, client};
use common::peers::{Bao, Issuer, TokenSpec};
use keybroker_csi::pb;

const ROUNDS: usize = 30;
const POLL_S: f64 = 2.0;

fn request(root: &Path, bao: &Bao, issuer: &Issuer, i: usize) -> pb::NodePublishVolumeRequest {
    let objects: String = (0..10)
        .map(|o| format!("- objectName: k{o}\n  secretPath: secret/app/k{o}\n  secretKey: value\n"))
        .collect();
    let uid = format!("22222222-0000-0000-0000-{i:012}");
    let name = format!("app-{i}");
    let tokens = issuer.kubelet_tokens(&[TokenSpec {
        ns: "bench",
        sa: "app",
        pod: &name,
        uid: &uid,
        audience: "vault",
        expires_in: 3600,
    }]);
    common::bench::publish_request(
        root,
        &name,
        &uid,
        &[
            ("roleName", "app".into()),
            ("vaultAddress", bao.addr.clone()),
            ("volumeType", "tmpfs".into()),
            ("objects", objects),
        ],
        HashMap::from([("csi.storage.k8s.io/serviceAccount.tokens".into(), tokens)]),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let root = tmp.path().to_owned();
    let (bao, issuer) = Bao::for_bench(&root);
    bao.put_bench_objects(10);
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: bench\n    namespace: bench\n    serviceAccounts: [app]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, caFile: \"{}\"}}}}\n    objects: [\"secret/app/*\"]\n",
            bao.addr,
            bao.ca.display()
        ),
    );
    let d = Daemon::start_with(&root, &format!("{POLL_S}s"));
    let mut node = client(&d).await;
    let http = keybroker::tls::client_builder(Some(&std::fs::read(&bao.ca).unwrap()), "OpenBao")
        .unwrap()
        .build()
        .unwrap();
    let jwt = issuer.token(&TokenSpec {
        ns: "bench",
        sa: "app",
        pod: "app-0",
        uid: "x",
        audience: "vault",
        expires_in: 3600,
    });

    // Interleaved rounds: cold keybroker, warm keybroker, per-pod baseline.
    let (mut cold, mut warm, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let first = request(&root, &bao, &issuer, 2 * r);
        let t = Instant::now();
        node.node_publish_volume(first.clone()).await.unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let second = request(&root, &bao, &issuer, 2 * r + 1);
        let t = Instant::now();
        node.node_publish_volume(second.clone()).await.unwrap();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        common::peers::vault_csi_provider_mount(&http, &bao, &jwt).await;
        base.push(t.elapsed().as_secs_f64() * 1e3);
        // The identity's last volume goes: keybroker revokes its token and drops its values,
        // so the next round starts cold.
        node.node_unpublish_volume(unpublish(&second))
            .await
            .unwrap();
        node.node_unpublish_volume(unpublish(&first)).await.unwrap();
    }
    let b50 = pct(&mut base, 0.5);
    println!("mount latency, 10 Vault KV objects, {ROUNDS} rounds (ms):");
    println!("| variant | p50 | p99 | p50 ratio to per-pod baseline |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        (
            "per-pod model: login + 10 sequential reads (baseline)",
            &mut base,
        ),
        (
            "keybroker cold: login + 10 parallel reads + mount",
            &mut cold,
        ),
        ("keybroker warm: cached token and values + mount", &mut warm),
    ] {
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        println!("| {name} | {p50:.2} | {p99:.2} | {:.2}× |", p50 / b50);
    }

    // Load: 100 volumes × 10 objects, counted at OpenBao over a window of poll cycles.
    let count = |bao: &Bao| bao.requests(|_, _| true);
    let before = count(&bao);
    let reqs: Vec<_> = (0..100)
        .map(|i| request(&root, &bao, &issuer, 1000 + i))
        .collect();
    let mut tasks = Vec::new();
    for req in reqs.clone() {
        let mut n = node.clone();
        tasks.push(tokio::spawn(
            async move { n.node_publish_volume(req).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let at_publish = count(&bao) - before;
    let window = Duration::from_secs(20);
    let w0 = count(&bao);
    tokio::time::sleep(window).await;
    let in_window = count(&bao) - w0;
    let cycles = window.as_secs_f64() / POLL_S;
    let per_cycle = in_window as f64 / cycles;
    let cycles_per_hour = 3600.0 / 120.0;
    let keybroker_hour = per_cycle * cycles_per_hour + 1.0;
    let per_pod_hour = 100.0 * 11.0 * cycles_per_hour;
    println!();
    println!("Vault requests, 100 volumes × 10 objects of one identity (counted at OpenBao):");
    println!("- publishing all 100: {at_publish} requests (login + mount lookups + reads)");
    println!(
        "- steady state: {in_window} requests in {:.0} s = {cycles:.0} poll cycles of {POLL_S} s = {per_cycle:.1} per cycle",
        window.as_secs_f64()
    );
    println!(
        "- per hour at a 2-minute poll: keybroker {keybroker_hour:.0} (per cycle × 30, + 1 login per 1 h token) vs per-pod model {per_pod_hour:.0} (100 pods × (1 login + 10 reads) × 30): {:.1}× fewer",
        per_pod_hour / keybroker_hour
    );
    for req in &reqs {
        node.node_unpublish_volume(unpublish(req)).await.unwrap();
    }
}
