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
    let ctx: HashMap<String, String> = [
        ("csi.storage.k8s.io/pod.name", format!("web-{i}")),
        ("csi.storage.k8s.io/pod.namespace", "bench".into()),
        ("csi.storage.k8s.io/pod.uid", uid.clone()),
        ("csi.storage.k8s.io/serviceAccount.name", "app".into()),
        ("csi.storage.k8s.io/ephemeral", "true".into()),
        ("provider", "local".into()),
        ("volumeType", kind.into()),
        ("objects", objects),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    pb::NodePublishVolumeRequest {
        volume_id: format!("csi-{uid}"),
        target_path: root.join(format!("pods/{uid}/mount")).display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
        }),
        readonly: true,
        volume_context: ctx,
        ..Default::default()
    }
}

pub fn unpublish(r: &pb::NodePublishVolumeRequest) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: r.volume_id.clone(),
        target_path: r.target_path.clone(),
    }
}
