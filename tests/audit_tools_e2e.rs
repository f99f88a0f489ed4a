//! The auditors' tools on a log the node wrote (issue #24): a pod's app and an interactive
//! shell in its container read its secret, the node reads it from outside the pod, a pod of
//! another service account is denied, the secret rotates. `keybroker audit query` answers the
//! same questions as jq over the same records; `keybroker audit report` opens in headless
//! Chromium with the network off (a screenshot kept in target/test-artifacts) and shows the
//! readers, the flags and the denial under "verified"; a tampered log's report says so at the
//! top.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::load::PodCgroup;
use common::node::*;
use common::*;

const OBJECTS: &str = "- objectName: password\n  object: db\n  key: password\n";
const HOSTILE: &str = "<img src=x onerror=alert(1)>\x1b[2J\u{202e}gpj.exe";
const CONTAINER: &str = "a11ce000a11ce000a11ce000a11ce000a11ce000a11ce000a11ce000a11ce000";

/// Sequence numbers of the records `keybroker audit query ARGS --format json` prints.
fn query_seqs(dir: &Path, args: &[&str]) -> BTreeSet<u64> {
    let out = output_ok(
        Command::new(BIN)
            .args(["audit", "query", "--format", "json"])
            .args(args)
            .arg(dir),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The same question asked of jq (Debian's, pinned by scripts/install-peers.sh).
fn jq_seqs(log: &Path, filter: &str) -> BTreeSet<u64> {
    let out = output_ok(
        Command::new("jq")
            .args(["-r", &format!("select({filter}) | .seq")])
            .arg(log),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// The report's first section, as the browser built it.
fn verification_section(dom: &str) -> &str {
    dom.split("<section id=\"verification\"")
        .nth(1)
        .and_then(|s| s.split("</section>").next())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_agrees_with_jq_and_the_report_opens_in_a_browser() {
    let (_tmp, root) = local_setup(r#"{"password":"S3cret-tools-1"}"#, "[db]");
    let audit_dir = root.join("audit");
    let audit = audit_dir.join("audit.jsonl");
    let d = Daemon::start_opts(&root, "1s", &audit, &[]);
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 71);
    let mut cg = PodCgroup::new(&pod.uid);
    let container = cg.container(CONTAINER);
    node.node_publish_volume(pod.request(&root, OBJECTS, "tmpfs", None))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let file = pod.target(&root).join("password");
    // The app (a program of its own name) and an interactive shell, in the pod's container.
    let app = root.join("app-server");
    std::fs::copy("/bin/cat", &app).unwrap();
    let inside = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{}{script}", PodCgroup::enter(&container)))
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    };
    inside(&format!(
        "for i in 1 2 3; do {} {} > /dev/null; done",
        app.display(),
        file.display()
    ));
    // (read fails at the end of a file without a newline: the open is what counts.)
    inside(&format!("sh -c 'read -r x < {}; :'", file.display()));
    // The node itself, outside the pod.
    assert_eq!(read_file(&file).unwrap(), "S3cret-tools-1");
    // A reader whose name is markup, a terminal escape and a right-to-left override (a
    // process names itself; its executable's path is whatever its filesystem holds).
    let hostile = root.join(HOSTILE);
    std::fs::copy("/bin/cat", &hostile).unwrap();
    let out = Command::new(&hostile).arg(&file).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // A pod of another service account: denied.
    let stranger = Pod {
        name: "stranger".into(),
        ..Pod::new("team-a", "other", 72)
    };
    assert!(
        node.node_publish_volume(stranger.request(&root, OBJECTS, "tmpfs", None))
            .await
            .is_err()
    );
    // A rotation.
    std::fs::write(root.join("secrets/db"), r#"{"password":"S3cret-tools-2"}"#).unwrap();
    wait_for("the rotation", Duration::from_secs(120), || {
        read_file(&file).is_ok_and(|v| v == "S3cret-tools-2")
    });
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    let mut d = d;
    d.stop();

    // Four questions, asked of keybroker and of jq.
    let questions: [(&[&str], &str); 4] = [
        (
            &["--event", "read", "--outside-pod"],
            r#".event == "read" and .pod.uid != null and .process.pod_uid != .pod.uid"#,
        ),
        (&["--event", "deny"], r#".event == "deny""#),
        (&["--process", "sh"], r#".process.comm == "sh""#),
        (
            &["--object", "db", "--event", "read", "--namespace", "team-a"],
            r#".object == "db" and .event == "read" and .pod.namespace == "team-a""#,
        ),
    ];
    for (args, jq) in questions {
        let ours = query_seqs(&audit_dir, args);
        assert!(!ours.is_empty(), "{args:?} found nothing");
        assert_eq!(ours, jq_seqs(&audit, jq), "{args:?} against jq {jq}");
    }

    // The report, in a browser with the network off.
    let page = root.join("report.html");
    output_ok(
        Command::new(BIN)
            .args(["audit", "report", "--since", "1h", "-o"])
            .arg(&page)
            .arg(&audit_dir),
    );
    let shot = artifacts_dir().join("audit-report.png");
    let dom = browser_dom(&page, Some(&shot));
    let verification = verification_section(&dom);
    assert!(
        verification.contains("class=\"ok\"") && verification.contains("chain intact"),
        "{verification}"
    );
    for seen in [
        "team-a/api-71",
        "app-server",
        "interactive shell",
        "outside the pod",
        "first seen",
        "team-a/stranger",
    ] {
        assert!(dom.contains(seen), "the report lacks {seen:?}");
    }
    println!("report screenshot: {}", shot.display());
    // The hostile name is text: escaped in the page, never an element, no override.
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    assert!(!dom.contains('\u{202e}') && !dom.contains('\x1b'));
    // In a terminal: the table shows it without a control or bidi character; JSON lines keep
    // the record as written, escaped.
    let table = output_ok(
        Command::new(BIN)
            .args(["audit", "query", "--outside-pod"])
            .arg(&audit_dir),
    );
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("<img src=x onerror=alert(1)>"), "{table}");
    assert!(
        !table
            .chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
        "{table:?}"
    );
    let json = output_ok(
        Command::new(BIN)
            .args(["audit", "query", "--format", "json", "--process"])
            .arg(&HOSTILE[..15])
            .arg(&audit_dir),
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        lines[0]["process"]["exe"].as_str(),
        Some(hostile.to_str().unwrap())
    );

    // A tampered copy: its report says so at the top, naming where.
    let forged = root.join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    for f in ["audit.jsonl", "audit.jsonl.head"] {
        std::fs::copy(audit_dir.join(f), forged.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(forged.join("audit.jsonl")).unwrap();
    std::fs::write(
        forged.join("audit.jsonl"),
        text.replacen(r#""comm":"sh""#, r#""comm":"ok""#, 1),
    )
    .unwrap();
    let page = root.join("forged.html");
    let out = Command::new(BIN)
        .args(["audit", "report", "--since", "1h", "-o"])
        .arg(&page)
        .arg(&forged)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let dom = browser_dom(
        &page,
        Some(&artifacts_dir().join("audit-report-tampered.png")),
    );
    let top = verification_section(&dom);
    assert!(
        top.contains("class=\"bad\"")
            && top.contains("NOT VERIFIED")
            && top.contains("audit.jsonl: line"),
        "{top}"
    );
}
