//! `keybroker provider` (the Secrets Store CSI provider API), measured over its unix socket as
//! the driver calls it, against OpenBao started here.
//!
//! - Mount latency for 10 cached objects (local provider and Vault), next to the gRPC floor
//!   (a `Version` call on the same socket) measured in the same run;
//! - side by side, interleaved: HashiCorp's Vault CSI provider model (login + 10 reads per
//!   Mount, `common::peers::vault_csi_provider_mount`) against keybroker as a provider, latency
//!   and the requests OpenBao sees for 20 pods mounting and for 10 rotation cycles (the driver
//!   re-Mounts every pod each cycle);
//! - the memory the provider adds: RSS idle and after 100 pods' Mounts.
//!
//! Run (root, after scripts/install-peers.sh): `cargo bench --bench provider_mount`

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{pct, rss_mib};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::node::{Daemon, Pod};
use common::peers::{Bao, TokenSpec};
use keybroker_csi::provider_pb::{self as pb, csi_driver_provider_client::CsiDriverProviderClient};

const POLL_S: u64 = 2;

fn rounds() -> usize {
    std::env::var("KB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn mount(
    root: &std::path::Path,
    pod: &Pod,
    params: &[(&str, &str)],
    tokens: &str,
) -> pb::MountRequest {
    let mut m: BTreeMap<&str, &str> = params.iter().copied().collect();
    m.insert("csi.storage.k8s.io/pod.name", &pod.name);
    m.insert("csi.storage.k8s.io/pod.namespace", pod.ns);
    m.insert("csi.storage.k8s.io/pod.uid", &pod.uid);
    m.insert("csi.storage.k8s.io/serviceAccount.name", pod.sa);
    m.insert("csi.storage.k8s.io/serviceAccount.tokens", tokens);
    pb::MountRequest {
        attributes: serde_json::to_string(&m).unwrap(),
        secrets: "{}".into(),
        target_path: root.join("driver").join(&pod.uid).display().to_string(),
        permission: "420".into(),
        current_object_version: vec![],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let root = tmp.path().to_owned();
    let (bao, issuer) = Bao::for_bench(&root);
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    bao.put_bench_objects(10);
    for o in 0..10 {
        std::fs::write(
            root.join(format!("secrets/k{o}")),
            format!("bench-value-{o}"),
        )
        .unwrap();
    }
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: vault\n    namespace: bench\n    serviceAccounts: [app]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, caFile: \"{}\"}}}}\n    objects: [\"secret/data/app/*\"]\n  - name: local\n    namespace: bench-local\n    serviceAccounts: [app]\n    identity: {{local: {{path: {}}}}}\n    objects: [\"k*\"]\n",
            bao.addr,
            bao.ca.display(),
            root.join("secrets").display()
        ),
    );
    let d = Daemon::start_opts(
        &root,
        &format!("{POLL_S}s"),
        &root.join("audit.jsonl"),
        &["provider"],
    );
    let pid = d.child.as_ref().unwrap().id();
    let idle = rss_mib(pid);
    let mut c = CsiDriverProviderClient::new(keybroker_csi::connect_unix(&d.sock).await.unwrap());
    let http = keybroker::tls::client_builder(Some(&std::fs::read(&bao.ca).unwrap()), "OpenBao")
        .unwrap()
        .build()
        .unwrap();
    let tokens = |p: &Pod| {
        issuer.kubelet_tokens(&[TokenSpec {
            ns: p.ns,
            sa: p.sa,
            pod: &p.name,
            uid: &p.uid,
            audience: "vault",
            expires_in: 3600,
        }])
    };
    let vault_objects: String = (0..10)
        .map(|o| {
            format!("- objectName: k{o}\n  secretPath: secret/data/app/k{o}\n  secretKey: value\n")
        })
        .collect();
    let local_objects: String = (0..10).map(|o| format!("- objectName: k{o}\n")).collect();
    let vault_params = [
        ("roleName", "app"),
        ("vaultAddress", bao.addr.as_str()),
        ("vaultAuthMountPath", "jwt"),
        ("objects", vault_objects.as_str()),
    ];
    let local_params = [("provider", "local"), ("objects", local_objects.as_str())];

    // --- OpenBao requests: 20 pods mounting (cold: nothing cached yet), then 10 rotation cycles -----------------------------
    let reads = || bao.requests(|_, p| p.starts_with("secret/data/app"));
    let logins = || bao.requests(|_, p| p == "auth/jwt/login");
    let pods: Vec<Pod> = (0..20).map(|i| Pod::new("bench", "app", 100 + i)).collect();
    let (r0, l0) = (reads(), logins());
    for p in &pods {
        c.mount(mount(&root, p, &vault_params, &tokens(p)))
            .await
            .unwrap();
    }
    let (kb_mount_r, kb_mount_l) = (reads() - r0, logins() - l0);
    let (r0, l0) = (reads(), logins());
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(POLL_S)).await;
        for p in &pods {
            c.mount(mount(&root, p, &vault_params, &tokens(p)))
                .await
                .unwrap();
        }
    }
    let (kb_cycle_r, kb_cycle_l) = (reads() - r0, logins() - l0);
    let (r0, l0) = (reads(), logins());
    for p in &pods {
        let v: serde_json::Value = serde_json::from_str(&tokens(p)).unwrap();
        common::peers::vault_csi_provider_mount(&http, &bao, v["vault"]["token"].as_str().unwrap())
            .await;
    }
    let (m_mount_r, m_mount_l) = (reads() - r0, logins() - l0);
    println!("## requests at OpenBao, 20 pods × 10 objects\n");
    println!("| | logins | reads | all |");
    println!("|---|---:|---:|---:|");
    println!(
        "| keybroker provider, 20 pods mounting | {kb_mount_l} | {kb_mount_r} | {} |",
        kb_mount_l + kb_mount_r
    );
    println!(
        "| keybroker provider, 10 rotation cycles of {POLL_S} s (200 Mounts) | {kb_cycle_l} | {kb_cycle_r} | {} |",
        kb_cycle_l + kb_cycle_r
    );
    println!(
        "| Vault CSI provider model, 20 pods mounting | {m_mount_l} | {m_mount_r} | {} |",
        m_mount_l + m_mount_r
    );
    println!(
        "| Vault CSI provider model, 10 rotation cycles (re-reads every object for every pod; logins per pod once) | 0 | {} | {} |",
        m_mount_r * 10,
        m_mount_r * 10
    );

    // --- latency, interleaved ------------------------------------------------------------------
    let n = rounds();
    let vpod = Pod::new("bench", "app", 1);
    let lpod = Pod::new("bench-local", "app", 2);
    let (vreq, lreq) = (
        mount(&root, &vpod, &vault_params, &tokens(&vpod)),
        mount(&root, &lpod, &local_params, &tokens(&lpod)),
    );
    let warm = c.mount(vreq.clone()).await.unwrap().into_inner();
    assert!(warm.error.is_none(), "{:?}\n{}", warm.error, d.logs());
    assert_eq!(warm.files.len(), 10);
    c.mount(lreq.clone()).await.unwrap();
    let jwt = {
        let v: serde_json::Value = serde_json::from_str(&tokens(&vpod)).unwrap();
        v["vault"]["token"].as_str().unwrap().to_owned()
    };
    let (mut floor, mut local, mut vault, mut model) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        c.version(pb::VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .unwrap();
        floor.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.mount(lreq.clone()).await.unwrap();
        local.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.mount(vreq.clone()).await.unwrap();
        vault.push(t.elapsed().as_secs_f64() * 1e3);
        if model.len() < 50 {
            let t = Instant::now();
            common::peers::vault_csi_provider_mount(&http, &bao, &jwt).await;
            model.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let f50 = pct(&mut floor, 0.5);
    println!("\n## Mount latency, 10 cached objects ({n} rounds, interleaved)\n");
    println!("| call | p50 | p99 | p50 ratio to the gRPC floor |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("gRPC floor: Version on the same socket", &mut floor),
        ("keybroker provider Mount, local provider", &mut local),
        ("keybroker provider Mount, Vault (warm)", &mut vault),
        (
            "Vault CSI provider model: login + 10 reads (50 rounds)",
            &mut model,
        ),
    ] {
        let p50 = pct(v, 0.5);
        println!(
            "| {name} | {p50:.3} ms | {:.3} ms | {:.1}× |",
            pct(v, 0.99),
            p50 / f50
        );
    }

    // --- memory ---------------------------------------------------------------------------------
    for i in 0..100 {
        let p = Pod::new("bench", "app", 1000 + i);
        c.mount(mount(&root, &p, &vault_params, &tokens(&p)))
            .await
            .unwrap();
    }
    println!("\n## memory\n");
    println!(
        "keybroker provider RSS: {idle:.1} MiB idle, {:.1} MiB after 120 pods' Mounts",
        rss_mib(pid)
    );
}
