//! Small helpers the benches share (benches/ include this module tree by path).

use std::collections::HashMap;
use std::path::Path;

use keybroker_csi::pb;

/// The `p` quantile (0.0 to 1.0) of `v`, nearest rank; sorts `v`.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A `kB` field of /proc/<pid>/status (`"VmRSS:"`, `"RssAnon:"`) or a count (`"Threads:"`);
/// NaN when the process is gone.
pub fn status_kib(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// VmRSS of a process in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

/// A publish for pod `i` of namespace `bench` (service account `app`): a volume of `kind` with
/// the local provider's objects `obj0`..`obj9` as `file0`..`file9`, under `root/pods/`.
pub fn local_volume(root: &Path, i: usize, kind: &str) -> pb::NodePublishVolumeRequest {
    let objects: String = (0..10)
        .map(|o| format!("- objectName: file{o}\n  object: obj{o}\n"))
        .collect();
    let uid = format!("00000000-0000-0000-0000-{i:012}");
    publish_request(
        root,
        &format!("web-{i}"),
        &uid,
        &[
            ("provider", "local".into()),
            ("volumeType", kind.into()),
            ("objects", objects),
        ],
        HashMap::new(),
    )
}

/// NodePublishVolume as kubelet sends it for pod `name` (uid `uid`) of namespace `bench`,
/// service account `app`: an ephemeral read-only volume at `root/pods/<uid>/mount` with the
/// pod's `attributes` and `secrets`.
pub fn publish_request(
    root: &Path,
    name: &str,
    uid: &str,
    attributes: &[(&str, String)],
    secrets: HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    super::node::kubelet_publish(
        ("bench", "app", name, uid),
        &root.join(format!("pods/{uid}/mount")),
        attributes.iter().map(|(k, v)| (k.to_string(), v.clone())),
        secrets,
    )
}

pub fn unpublish(r: &pb::NodePublishVolumeRequest) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: r.volume_id.clone(),
        target_path: r.target_path.clone(),
    }
}

/// A `keybroker node` (the binary `bin`) for the benches, in `root`: the local provider's
/// objects `obj0`..`obj9` (110 bytes each) bound to `bench/app`, its CSI socket at
/// `root/csi.sock`, metrics on `metrics`. Returns the process and a client once the socket
/// answers.
pub async fn start_local_node(
    bin: &str,
    root: &Path,
    metrics: &str,
) -> (
    std::process::Child,
    pb::node_client::NodeClient<tonic::transport::Channel>,
) {
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    for o in 0..10 {
        std::fs::write(
            root.join(format!("secrets/obj{o}")),
            format!("value-{o}-{}", "x".repeat(100)),
        )
        .unwrap();
    }
    let objects: Vec<String> = (0..10).map(|o| format!("obj{o}")).collect();
    std::fs::write(
        root.join("bindings.yaml"),
        format!(
            "bindings:\n  - name: bench\n    namespace: bench\n    serviceAccounts: [app]\n    identity: {{local: {{path: {}}}}}\n    objects: {objects:?}\n",
            root.join("secrets").display()
        ),
    )
    .unwrap();
    let sock = root.join("csi.sock");
    let child = std::process::Command::new(bin)
        .args(["node", "--node-id", "bench", "--log", "warn"])
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .arg(format!(
            "--bindings={}",
            root.join("bindings.yaml").display()
        ))
        .arg(format!("--state-dir={}", root.join("state").display()))
        .arg(format!(
            "--audit-log={}",
            root.join("audit.jsonl").display()
        ))
        .arg(format!("--metrics-addr={metrics}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let channel = loop {
        if let Ok(c) = keybroker_csi::connect_unix(&sock).await {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "node not up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    (child, pb::node_client::NodeClient::new(channel))
}
