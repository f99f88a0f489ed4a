//! The auditors' tools over a big log (issue #24): `audit verify`, `audit query` (a selective
//! filter over everything, and the last day only) and `audit report` over a segmented log of
//! KB_RECORDS records (default 400,000, about a month of a node whose pods read a few hundred
//! times an hour), each against the same log read by the simplest tools an auditor has: the
//! bytes read (`cat`), and Python parsing every line as JSON (what a jq or Python script pays).
//!
//! Run: `cargo bench --bench audit_tools` (release; a temporary directory; no root needed).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use keybroker::audit::{AuditLog, AuditOptions, Event, EventKind, PodRef, Rotation};
use keybroker::procinfo::ProcessRef;

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn run(bin: &Path, args: &[&str]) -> (f64, std::process::Output) {
    let t = Instant::now();
    let out = Command::new(bin).args(args).output().unwrap();
    (secs(t), out)
}

fn main() {
    let n: usize = std::env::var("KB_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let log_path = dir.join("audit.jsonl");
    // A month: the records' times are spread over 30 days ending now.
    let start = SystemTime::now() - Duration::from_secs(30 * 86400);
    let step = Duration::from_secs(30 * 86400) / n as u32;
    let t = Instant::now();
    {
        let log = AuditLog::open_with(
            &log_path,
            AuditOptions {
                rotation: Some(Rotation {
                    max_segment_bytes: 16 << 20,
                    retain_bytes: None,
                    retain_age: None,
                    ..Rotation::default()
                }),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..n {
            let pod = i % 40;
            let e = Event::new(EventKind::Read)
                .volume(format!("csi-{pod:036}"))
                .object(format!("secret/app-{}", i % 25))
                .file("password")
                .version("0123456789abcdef")
                .pod(PodRef {
                    namespace: format!("team-{}", pod % 8),
                    name: format!("api-{pod}"),
                    uid: format!("{pod:036}"),
                    service_account: "api".into(),
                })
                .process(ProcessRef {
                    pid: 1000 + i as u32 % 30000,
                    uid: 1000,
                    gid: 1000,
                    comm: Some(if i % 997 == 0 { "sh" } else { "server" }.into()),
                    exe: Some("/app/server".into()),
                    pod_uid: Some(format!("{pod:036}")),
                    container: Some(format!("{:064x}", pod)),
                    cgroup: Some(format!("/kubepods/pod{pod:036}/{:064x}", pod)),
                    ..Default::default()
                });
            log.record_at(start + step * i as u32, e);
        }
        log.flush();
    }
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!(
        "{n} records, {:.0} MiB in {} files, written in {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        std::fs::read_dir(&dir).unwrap().count(),
        secs(t)
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_keybroker"));
    let d = dir.to_str().unwrap();
    // Baselines, same log, same run.
    let t = Instant::now();
    let mut raw = 0u64;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        raw += std::fs::read(e.path()).unwrap().len() as u64;
    }
    let cat = secs(t);
    assert_eq!(raw, bytes);
    let py = common::peers::peers_python();
    let script = "import json,sys,glob\nn=0\nfor f in sorted(glob.glob(sys.argv[1]+'/audit.jsonl*')):\n  for l in open(f):\n    r=json.loads(l)\n    n+= r.get('object')=='secret/app-7' and r.get('event')=='read'\nprint(n)";
    let t = Instant::now();
    let out = Command::new(&py).args(["-c", script, d]).output().unwrap();
    let python = secs(t);
    assert!(out.status.success());
    let (verify, out) = run(bin, &["audit", "verify", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (query_all, out) = run(
        bin,
        &[
            "audit",
            "query",
            "--object",
            "secret/app-7",
            "--format",
            "json",
            d,
        ],
    );
    assert!(out.status.success());
    let matched = out.stdout.iter().filter(|b| **b == b'\n').count();
    let (query_day, out) = run(
        bin,
        &["audit", "query", "--since", "1d", "--process", "sh", d],
    );
    assert!(out.status.success());
    let page = tmp.path().join("report.html");
    let (report, out) = run(
        bin,
        &[
            "audit",
            "report",
            "--since",
            "30d",
            "-o",
            page.to_str().unwrap(),
            d,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::metadata(&page).unwrap().len();
    let t = Instant::now();
    let dom = common::browser_dom(&page);
    let browser = secs(t);
    assert!(dom.contains("Audit report"));
    println!("| tool | seconds | ratio to reading the bytes |");
    println!("|---|---:|---:|");
    for (name, s) in [
        ("read the bytes (baseline)", cat),
        (
            "python: json.loads every line, count one object's reads",
            python,
        ),
        ("keybroker audit verify DIR", verify),
        (
            "keybroker audit query --object secret/app-7 (whole log)",
            query_all,
        ),
        ("keybroker audit query --since 1d --process sh", query_day),
        ("keybroker audit report --since 30d", report),
        ("chromium opens the report (headless, to DOM)", browser),
    ] {
        println!("| {name} | {s:.2} | {:.1}x |", s / cat);
    }
    println!(
        "query matched {matched} records; report {:.0} KiB",
        html as f64 / 1024.0
    );
}
