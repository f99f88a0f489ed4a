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

/// Runs `cmd` to completion, sampling its peak resident memory (VmHWM) meanwhile.
fn run_peak(cmd: &mut Command) -> (f64, std::process::ExitStatus, u64) {
    let t = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kib * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (secs(t), status, peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Records per second the node's writer takes, with and without a signing key.
fn write_throughput(dir: &Path, signed: bool, n: usize) -> f64 {
    let key = signed.then(|| {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        std::sync::Arc::new(keybroker::audit::SigningKey::from_pkcs8(doc.as_ref()).unwrap())
    });
    let log = AuditLog::open_with(
        &dir.join(format!("throughput-{signed}.jsonl")),
        AuditOptions {
            rotation: Some(Rotation::default()),
            signing_key: key,
            ..Default::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    for i in 0..n {
        log.record(
            Event::new(EventKind::Read)
                .object(format!("secret/app-{}", i % 25))
                .file("password")
                .version("0123456789abcdef"),
        );
    }
    log.checkpoint();
    n as f64 / secs(t)
}

fn main() {
    let n: usize = std::env::var("KB_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let tmp = tempfile::tempdir().unwrap();
    // KB_AUDIT_DIR keeps the log for profiling (`perf record keybroker audit query ... DIR`).
    let dir = match std::env::var_os("KB_AUDIT_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().join("audit"),
    };
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
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat $(ls {d}/audit.jsonl.* | sort) {d}/audit.jsonl | jq -c 'select(.object == \"secret/app-7\")' | wc -l"
        ))
        .output()
        .unwrap();
    let jq = secs(t);
    let jq_matched: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
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
    let (report, status, report_peak) = run_peak(Command::new(bin).args([
        "audit",
        "report",
        "--since",
        "30d",
        "-o",
        page.to_str().unwrap(),
        d,
    ]));
    assert!(status.success());
    let html = std::fs::metadata(&page).unwrap().len();
    let t = Instant::now();
    let dom = common::browser_dom(&page, None);
    let browser = secs(t);
    assert!(dom.contains("Audit report"));
    assert_eq!(jq_matched, matched, "jq and keybroker agree");
    let mib = bytes as f64 / (1 << 20) as f64;
    println!("| tool | seconds | MiB/s | ratio to reading the bytes |");
    println!("|---|---:|---:|---:|");
    for (name, s) in [
        ("read the bytes (baseline)", cat),
        ("jq -c 'select(.object == ...)' (baseline)", jq),
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
        println!("| {name} | {s:.2} | {:.0} | {:.1}x |", mib / s, s / cat);
    }
    println!(
        "query matched {matched} records (jq {jq_matched}); query is {:.1}x faster than jq; report {:.0} KiB, peak RSS {:.1} MiB",
        jq / query_all,
        html as f64 / 1024.0,
        report_peak as f64 / (1 << 20) as f64
    );
    let plain = write_throughput(tmp.path(), false, 200_000);
    let signed = write_throughput(tmp.path(), true, 200_000);
    println!(
        "writer: {plain:.0} records/s unsigned, {signed:.0} records/s with --audit-signing-key ({:.2}x)",
        signed / plain
    );
}
