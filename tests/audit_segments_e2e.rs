//! The node's audit log rotates into sealed segments under a steady write load, survives
//! kill -9 at any moment (also in the middle of a seal), and retention prunes whole oldest
//! segments: `keybroker audit verify DIR` passes on what is left, and says it was pruned. The
//! log is signed (`--audit-signing-key`): `verify --public-key` passes, and fails on a copy
//! that someone holding only the public key altered and re-chained (issue #24).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::Digest;

use common::node::*;
use common::*;

const OBJECTS: &str = "- objectName: password\n  object: db\n  key: password\n";

/// A reader loop (a new `cat` process per open: a record each) until dropped.
struct Load(std::process::Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_survive_kill_9_mid_seal_and_retention_prunes_verifiably() {
    let (_tmp, root) = local_setup(r#"{"password":"S3cret-segments-5"}"#, "[db]");
    let audit_dir = root.join("audit");
    let audit = audit_dir.join("audit.jsonl");
    let (key, public) = (root.join("signing.pem"), root.join("signing.pub.pem"));
    output_ok(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key),
    );
    output_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    // Tiny segments (a seal every few dozen records) and a small budget, so that seals and
    // pruning happen many times a second under the load.
    let key_arg = key.to_str().unwrap();
    let args = [
        "--audit-max-segment-bytes",
        "8KiB",
        "--audit-retain",
        "64KiB",
        "--audit-signing-key",
        key_arg,
    ];
    let pod = Pod::new("team-a", "api", 61);
    let mut d = Daemon::start_opts(&root, "1h", &audit, &args);
    let mut node = client(&d).await;
    node.node_publish_volume(pod.request(&root, OBJECTS, "tmpfs", None))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let file = pod.target(&root).join("password");
    let _load = Load(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do cat {} > /dev/null; done",
                file.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let segments_now = || keybroker::audit::sealed_segments(&audit).unwrap().len();
    for round in 0..12u64 {
        // Let the log seal a few segments, then kill at a moment unrelated to any seal.
        let sealed = segments_now();
        wait_for("a seal under the load", Duration::from_secs(120), || {
            segments_now() != sealed
        });
        tokio::time::sleep(Duration::from_millis(7 * round + 3)).await;
        d.kill9();
        d = Daemon::start_opts(&root, "1h", &audit, &args);
        // kubelet republishes after a restart; the volume was taken over either way.
        let mut node = client(&d).await;
        node.node_publish_volume(pod.request(&root, OBJECTS, "tmpfs", None))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}\n{}", d.logs()));
    }
    // Restarts that found a seal cut short (its record written, its rename not): how often
    // the kill landed there (it depends on timing; verification must pass either way).
    let finished_seals = d
        .logs()
        .matches("finished sealing a segment a crash interrupted")
        .count();
    // Quiet, then stop cleanly: verify what is on disk.
    drop(_load);
    let mut node = client(&d).await;
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    d.stop();
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&audit_dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\nthe active segment:\n{}\nthe head: {}\n{}",
        std::fs::read_to_string(&audit).unwrap_or_default(),
        std::fs::read_to_string(audit.with_extension("jsonl.head")).unwrap_or_default(),
        tail(&d.logs(), 6000)
    );
    assert!(said.contains("segments"), "{said}");
    assert!(said.contains("deleted by retention"), "{said}");
    // Retention kept the budget (with one segment of slack: pruning happens at a seal).
    let total: u64 = keybroker::audit::sealed_segments(&audit)
        .unwrap()
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .sum::<u64>()
        + std::fs::metadata(&audit).unwrap().len();
    assert!(total <= (64 + 2 * 8) << 10, "{total} bytes kept");
    // Every record follows the documented schema (seal, prune, gap, read, mount ...).
    let mut files: Vec<std::path::PathBuf> = keybroker::audit::sealed_segments(&audit)
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect();
    files.push(audit.clone());
    let n = assert_audit_schema(&files);
    println!(
        "{said}{n} records follow docs/audit-record.schema.json; {finished_seals} of 12 restarts finished a seal a kill had cut short"
    );

    // The query an incident responder runs: reads by processes outside the volume's pod (the
    // load's `cat`s run on the node, in no pod), as JSON lines, with the verdict on stderr.
    let out = Command::new(BIN)
        .args([
            "audit",
            "query",
            "--since",
            "1h",
            "--event",
            "read",
            "--outside-pod",
            "--format",
            "json",
            "--public-key",
        ])
        .arg(&public)
        .arg(&audit_dir)
        .output()
        .unwrap();
    let verdict = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{verdict}");
    assert!(verdict.contains("verified: chain intact"), "{verdict}");
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!rows.is_empty(), "{verdict}");
    assert!(
        rows.iter()
            .all(|r| r["event"] == "read" && r["process"]["comm"] == "cat"),
        "{rows:?}"
    );
    // The same as a table, for people.
    let out = Command::new(BIN)
        .args(["audit", "query", "--event", "read", "--process", "cat"])
        .arg(&audit_dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.starts_with("TIME (UTC)"),
        "{table}"
    );
    assert!(table.contains("team-a/api-61"), "{table}");

    // The auditors' page for the last hour, opened in a real browser.
    let page = root.join("report.html");
    output_ok(
        Command::new(BIN)
            .args(["audit", "report", "--since", "1h", "--public-key"])
            .arg(&public)
            .arg("--out")
            .arg(&page)
            .arg(&audit_dir),
    );
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: no script, no external resource, and a policy that forbids any.
    assert!(html.contains("default-src 'none'"));
    for banned in [
        "<script", "<link", "<img", "<iframe", "@import", "url(", "http://", "https://",
    ] {
        assert!(!html.contains(banned), "the report holds {banned:?}");
    }
    let dom = browser_dom(&page, None);
    assert!(dom.contains("<h1>Audit report</h1>"), "{dom}");
    assert!(dom.contains("chain intact") && dom.contains("signed checkpoints verified"));
    assert!(dom.contains("<h3>db</h3>"), "the secret read");
    assert!(dom.contains("outside the pod"), "the node's cat is flagged");
    assert!(dom.contains("uid 0"));
    assert!(
        dom.contains("keybroker restarted"),
        "the restarts' gaps are listed"
    );
    println!("report: {} bytes, rendered by chromium", html.len());

    // With the public key alone: the signatures verify.
    let verify_signed = |dir: &std::path::Path| {
        Command::new(BIN)
            .args(["audit", "verify", "--public-key"])
            .arg(&public)
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = verify_signed(&audit_dir);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("signed checkpoints verified"), "{said}");
    // Someone with the public key alone edits a read record and recomputes every link after
    // it and the head anchor: the plain chain verifies, the signatures do not.
    let forged = root.join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    let mut all: Vec<(std::path::PathBuf, Vec<String>)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            (
                forged.join(f.file_name().unwrap()),
                text.lines().map(str::to_owned).collect(),
            )
        })
        .collect();
    let (fi, li) = all
        .iter()
        .enumerate()
        .find_map(|(fi, (_, lines))| {
            lines
                .iter()
                .position(|l| l.contains(r#""event":"read""#))
                .map(|li| (fi, li))
        })
        .expect("a read record");
    all[fi].1[li] = all[fi].1[li].replace(r#""comm":"cat""#, r#""comm":"app""#);
    let mut prev_line: Option<String> = None;
    for (_, lines) in all.iter_mut() {
        for l in lines.iter_mut() {
            if let Some(p) = &prev_line {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["prev"] = hex::encode(sha2::Sha256::digest(p.as_bytes())).into();
                *l = serde_json::to_string(&v).unwrap();
            }
            prev_line = Some(l.clone());
        }
    }
    for (path, lines) in &all {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }
    let last = prev_line.unwrap();
    let mut head: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(audit_dir.join("audit.jsonl.head")).unwrap())
            .unwrap();
    head["hash"] = hex::encode(sha2::Sha256::digest(last.as_bytes())).into();
    std::fs::write(forged.join("audit.jsonl.head"), head.to_string()).unwrap();
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&forged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a re-chained plain log verifies without the key: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = verify_signed(&forged);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("checkpoint") || said.contains("head anchor"),
        "{said}"
    );
    println!("forged copy: {said}");
}

/// The end of a long text (whole lines).
fn tail(s: &str, max: usize) -> &str {
    let from = s.len().saturating_sub(max);
    let from = s[from..].find('\n').map_or(from, |i| from + i + 1);
    &s[from..]
}
