//! CSI conformance: kubernetes-csi/csi-test's csi-sanity (pinned, installed by
//! scripts/install-peers.sh) against `keybroker node`, Identity and Node services, including
//! the publish/unpublish lifecycle and idempotency. The node-only driver is given the test-only
//! controller stub (cargo feature `test-controller`) so csi-sanity can "create" volumes; the
//! stub never exists in a release build.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether this test build has the controller stub (a missing stub fails the test, never skips it).
const TEST_CONTROLLER: bool = cfg!(feature = "test-controller");

#[test]
fn csi_sanity_passes_against_keybroker_node() {
    require_root_and_fuse();
    if !TEST_CONTROLLER {
        panic!(
            "csi-sanity needs the test controller stub: run `cargo test --features test-controller` (scripts/test.sh does)"
        );
    }
    let sanity = std::env::var_os("CSI_SANITY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".peers/bin/csi-sanity"));
    assert!(
        sanity.exists(),
        "{} is missing: run scripts/install-peers.sh",
        sanity.display()
    );

    let tmp = open_tempdir();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/secret"), "sanity-value").unwrap();
    std::fs::write(
        d.join("bindings.yaml"),
        format!(
            "bindings:\n  - name: sanity\n    namespace: sanity\n    serviceAccounts: [sanity]\n    identity: {{local: {{path: {}}}}}\n    objects: [secret]\n",
            d.join("secrets").display()
        ),
    )
    .unwrap();
    // csi-sanity passes these to CreateVolume; the stub returns them as volume_context, so each
    // NodePublishVolume carries pod info and a request the bindings allow.
    std::fs::write(
        d.join("params.yaml"),
        "csi.storage.k8s.io/pod.name: sanity\ncsi.storage.k8s.io/pod.namespace: sanity\ncsi.storage.k8s.io/pod.uid: 00000000-0000-0000-0000-000000000001\ncsi.storage.k8s.io/serviceAccount.name: sanity\nprovider: local\nobjects: |\n  - objectName: secret\n",
    )
    .unwrap();
    let sock = d.join("csi.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(d.join("node.log")).unwrap();
    let mut node = Command::new(BIN)
        .args([
            "node",
            "--danger-test-controller",
            "--node-id",
            "sanity-node",
            // Restarts are not csi-sanity's subject: no fd keeper to leave behind.
            "--fd-keeper",
            "off",
        ])
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .arg(format!("--bindings={}", d.join("bindings.yaml").display()))
        .arg(format!("--state-dir={}", d.join("state").display()))
        .arg(format!("--audit-log={}", d.join("audit.jsonl").display()))
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no CSI socket: {}",
            std::fs::read_to_string(d.join("node.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(&sanity)
        .arg(format!("--csi.endpoint=unix://{}", sock.display()))
        .arg(format!("--csi.mountdir={}", d.join("mnt").display()))
        .arg(format!("--csi.stagingdir={}", d.join("stage").display()))
        .arg(format!(
            "--csi.testvolumeparameters={}",
            d.join("params.yaml").display()
        ))
        .arg("--ginkgo.skip=\\[Controller Server\\]")
        .args(["--ginkgo.v", "--ginkgo.no-color"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let _ = node.kill();
    let _ = node.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{text}\nnode log:\n{}",
        std::fs::read_to_string(d.join("node.log")).unwrap()
    );
    // The lifecycle specs, not just argument checks, must have run.
    for spec in [
        "Node Service should work",
        "Node Service should be idempotent",
        "NodeUnpublishVolume should remove target path",
    ] {
        assert!(
            text.contains(spec),
            "csi-sanity did not run {spec:?}:\n{text}"
        );
    }
    let summary = text
        .lines()
        .find(|l| l.contains("Passed") && l.contains("Failed"))
        .unwrap_or("");
    assert!(summary.contains("0 Failed"), "{summary}");
    eprintln!("csi-sanity: {summary}");
    let mounts = audit_records(&d.join("audit.jsonl"))
        .iter()
        .filter(|r| r["event"] == "mount")
        .count();
    assert!(
        mounts >= 2,
        "csi-sanity's publishes did not reach keybroker ({mounts} mounts)"
    );
}
