//! `keybroker mount` end to end: the built binary, real FUSE and tmpfs mounts, read by other
//! processes and an unprivileged uid; rotation under concurrent readers; invalid configs;
//! audit completeness and tamper detection; no secret anywhere it must not be; kill -9 recovery.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;
const DB_PASS: &str = "S3cret-db-pass-7f1c9a";
const API_KEY: &str = "S3cret-api-key-c0ffee";
const RAW_TOKEN: &str = "S3cret-raw-token-42";

fn secrets_source(dir: &Path) {
    let src = dir.join("secrets");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("api-key"), API_KEY).unwrap();
    std::fs::write(
        src.join("db"),
        format!(r#"{{"username":"app","password":"{DB_PASS}","port":5432}}"#),
    )
    .unwrap();
    use base64::Engine;
    std::fs::write(
        src.join("token-b64"),
        base64::engine::general_purpose::STANDARD.encode(RAW_TOKEN),
    )
    .unwrap();
    std::fs::write(src.join("token-hex"), hex::encode(RAW_TOKEN)).unwrap();
}

fn config(dir: &Path, kind: &str, extra_files: &str) -> std::path::PathBuf {
    let text = format!(
        r#"provider:
  local:
    path: secrets
volume:
  type: {kind}
  pollInterval: 1s
  gid: {NOBODY}
audit:
  path: audit.jsonl
files:
  - name: api-key
    object: api-key
    mode: "0444"
  - name: private-key-alias
    object: api-key
    mode: "0400"
  - name: db-password
    object: db
    key: password
    mode: "0440"
  - name: db-port
    object: db
    key: port
  - name: database-url
    object: db
    template: "postgresql://{{{{username}}}}:{{{{password}}}}@db:{{{{port}}}}/app"
  - name: token
    object: token-b64
    encoding: base64
  - name: token-from-hex
    object: token-hex
    encoding: hex
{extra_files}"#
    );
    let path = dir.join("keybroker.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn contents_modes_and_other_uid(kind: &str) {
    require_root_and_fuse();
    let tmp = open_tempdir();
    secrets_source(tmp.path());
    let cfg = config(tmp.path(), kind, "");
    let mnt = tmp.path().join("mnt");
    let m = Mounted::start(&cfg, &mnt, &[], "api-key");

    // Contents, as a separate unprivileged process reads them (gid = the volume's group).
    let expect = [
        ("api-key", API_KEY.to_owned(), 0o444),
        ("db-password", DB_PASS.to_owned(), 0o440),
        ("db-port", "5432".to_owned(), 0o440),
        (
            "database-url",
            format!("postgresql://app:{DB_PASS}@db:5432/app"),
            0o440,
        ),
        ("token", RAW_TOKEN.to_owned(), 0o440),
        ("token-from-hex", RAW_TOKEN.to_owned(), 0o440),
    ];
    for (name, want, mode) in &expect {
        let path = mnt.join(name);
        let (ok, out, err) = run_as(NOBODY, NOBODY, "cat", &[path.to_str().unwrap()]);
        assert!(ok, "{kind}: nobody cannot read {name}: {err}");
        assert_eq!(&out, want, "{kind}: {name}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            *mode,
            "{kind}: mode of {name}"
        );
        assert!(meta.is_file());
    }
    // Mode 0400 owned by root: the kernel refuses another uid, root reads it.
    let alias = mnt.join("private-key-alias");
    let (ok, _, err) = run_as(NOBODY, NOBODY, "cat", &[alias.to_str().unwrap()]);
    assert!(
        !ok && err.contains("Permission denied"),
        "{kind}: 0400 file readable by nobody: {err}"
    );
    assert_eq!(read_file(&alias).unwrap(), API_KEY);
    // Read-only: no writes, no new files.
    assert!(
        std::fs::write(mnt.join("api-key"), "x").is_err(),
        "{kind}: write succeeded"
    );
    assert!(
        std::fs::write(mnt.join("new-file"), "x").is_err(),
        "{kind}: create succeeded"
    );
    let logs = m.stop();

    // Nothing secret on disk beneath the mount point, in the logs or in the audit log.
    let audit = tmp.path().join("audit.jsonl");
    assert_no_secrets(
        &[DB_PASS, API_KEY, RAW_TOKEN],
        &[&mnt, &audit],
        &[("logs", &logs)],
    );
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "{kind}: files left beneath the mount point"
    );
}

#[test]
fn fuse_serves_contents_modes_aliases_encodings_keys_templates() {
    contents_modes_and_other_uid("fuse");
}

#[test]
fn tmpfs_serves_contents_modes_aliases_encodings_keys_templates() {
    contents_modes_and_other_uid("tmpfs");
}

/// The YAML source for the rotation test: generation `n` of a cert/key pair, with sizes that
/// change every generation so a stale size or a half-written file would show.
fn pair_yaml(n: usize) -> String {
    format!(
        "tls:\n  cert: \"CERT-{n}-{}\"\n  key: \"KEY-{n}-{}\"\n",
        "c".repeat(n * 37 % 500),
        "k".repeat(n * 53 % 700)
    )
}

fn parse_gen(s: &str, prefix: &str) -> Option<usize> {
    let rest = s.strip_prefix(prefix)?;
    let (n, pad) = rest.split_once('-')?;
    let n: usize = n.parse().ok()?;
    let want_len = if prefix == "CERT-" {
        n * 37 % 500
    } else {
        n * 53 % 700
    };
    (pad.len() == want_len && pad.chars().all(|c| c == pad.chars().next().unwrap_or('c')))
        .then_some(n)
}

fn rotation_under_concurrent_readers(kind: &'static str) {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let src = tmp.path().join("secrets.yaml");
    std::fs::write(&src, pair_yaml(1)).unwrap();
    let cfg = tmp.path().join("keybroker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "provider: {{local: {{path: secrets.yaml}}}}\nvolume: {{type: {kind}, pollInterval: 1s}}\naudit: {{path: audit.jsonl}}\nfiles:\n  - {{name: tls.crt, object: tls, key: cert}}\n  - {{name: tls.key, object: tls, key: key}}\n  - {{name: bundle.pem, object: tls, template: \"{{{{cert}}}}|{{{{key}}}}\"}}\n"
        ),
    )
    .unwrap();
    let mnt = tmp.path().join("mnt");
    let m = Mounted::start(&cfg, &mnt, &[], "bundle.pem");

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (stop, reads, mnt) = (stop.clone(), reads.clone(), mnt.clone());
        readers.push(std::thread::spawn(move || -> Result<usize, String> {
            let mut max_seen = 0;
            while !stop.load(Ordering::Relaxed) {
                // Each file is whole: one open sees one version, never a mix or a prefix.
                let bundle =
                    read_file(&mnt.join("bundle.pem")).map_err(|e| format!("reader {r}: {e}"))?;
                let (c, k) = bundle
                    .split_once('|')
                    .ok_or(format!("bundle without separator: {} bytes", bundle.len()))?;
                let (cn, kn) = (parse_gen(c, "CERT-"), parse_gen(k, "KEY-"));
                if cn.is_none() || cn != kn {
                    return Err(format!(
                        "mixed or partial bundle: cert gen {cn:?}, key gen {kn:?}"
                    ));
                }
                let cert = read_file(&mnt.join("tls.crt")).map_err(|e| e.to_string())?;
                let n = parse_gen(&cert, "CERT-")
                    .ok_or(format!("partial tls.crt ({} bytes)", cert.len()))?;
                if kind == "tmpfs" {
                    // The kubelet contract: resolve ..data once, then both files are one snapshot.
                    let snap = std::fs::read_link(mnt.join("..data")).map_err(|e| e.to_string())?;
                    let cert = read_file(&mnt.join(&snap).join("tls.crt"));
                    let key = read_file(&mnt.join(&snap).join("tls.key"));
                    // A snapshot directory may be removed right after we resolved it: retry then.
                    if let (Ok(cert), Ok(key)) = (cert, key)
                        && parse_gen(&cert, "CERT-") != parse_gen(&key, "KEY-")
                    {
                        return Err("cert and key of one ..data snapshot differ".into());
                    }
                }
                max_seen = max_seen.max(n);
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(max_seen)
        }));
    }
    let generations = 25;
    for n in 2..=generations {
        write_atomic(&src, &pair_yaml(n));
        std::thread::sleep(Duration::from_millis(120));
    }
    // The last change shows within the poll interval (1 s; the watch makes it faster).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cert = read_file(&mnt.join("tls.crt")).unwrap();
        if parse_gen(&cert, "CERT-") == Some(generations) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last rotation not visible: {}",
            &cert[..20.min(cert.len())]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let max_seen = r.join().unwrap().unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(
            max_seen >= generations - 1,
            "{kind}: readers saw up to generation {max_seen}"
        );
    }
    assert!(
        reads.load(Ordering::Relaxed) > 100,
        "{kind}: too few reads to prove anything"
    );
    m.stop();
    let records = audit_records(&tmp.path().join("audit.jsonl"));
    let rotations = records.iter().filter(|r| r["event"] == "rotate").count();
    assert!(
        rotations >= 3 * 10,
        "{kind}: only {rotations} rotate records for {generations} generations × 3 files"
    );
}

#[test]
fn fuse_rotation_is_atomic_for_concurrent_readers() {
    rotation_under_concurrent_readers("fuse");
}

#[test]
fn tmpfs_rotation_is_atomic_for_concurrent_readers() {
    rotation_under_concurrent_readers("tmpfs");
}

#[test]
fn invalid_configs_and_hostile_names_mount_nothing() {
    require_root_and_fuse();
    let tmp = open_tempdir();
    secrets_source(tmp.path());
    let cases: &[(&str, &str)] = &[
        ("  - {name: ../../etc/cron.d/x, object: api-key}\n", "'..'"),
        ("  - {name: /etc/passwd, object: api-key}\n", "absolute"),
        (
            "  - {name: missing, object: no-such-object}\n",
            "\"no-such-object\" was not found",
        ),
        (
            "  - {name: k, object: api-key, key: password}\n",
            "not a JSON object",
        ),
        ("  - {name: k, object: db, key: nope}\n", "no key \"nope\""),
        (
            "  - {name: k, object: api-key, encoding: base64}\n",
            "not valid Base64",
        ),
        (
            "  - {name: k, object: ../secrets/api-key}\n",
            "object \"../secrets/api-key\"",
        ),
        ("  - {name: api-key, object: db}\n", "used twice"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let cfg = config(tmp.path(), "fuse", extra);
        let mnt = tmp.path().join(format!("mnt{i}"));
        let out = mount_output(&cfg, &mnt);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} mounted: {extra}");
        assert!(
            stderr.contains(want),
            "case {i}: want {want:?} in:\n{stderr}"
        );
        assert!(!is_mount_point(&mnt), "case {i}: something was mounted");
        assert_no_secrets(&[DB_PASS, API_KEY], &[], &[("stderr", &stderr)]);
    }
    // Size limit: an object over maxObjectBytes is refused before mounting.
    let cfg = tmp.path().join("small.yaml");
    std::fs::write(&cfg, "provider: {local: {path: secrets}}\nvolume: {limits: {maxObjectBytes: 8}}\nfiles:\n  - {name: a, object: api-key}\n").unwrap();
    let mnt = tmp.path().join("mnt-small");
    let out = mount_output(&cfg, &mnt);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("maxObjectBytes"));
    assert!(!is_mount_point(&mnt));
}

#[test]
fn audit_records_every_event_and_verify_catches_tampering() {
    require_root_and_fuse();
    let tmp = open_tempdir();
    secrets_source(tmp.path());
    let cfg = config(tmp.path(), "fuse", "");
    let mnt = tmp.path().join("mnt");
    let m = Mounted::start(&cfg, &mnt, &[], "api-key");
    let (ok, _, _) = run_as(
        NOBODY,
        NOBODY,
        "cat",
        &[mnt.join("db-password").to_str().unwrap()],
    );
    assert!(ok);
    write_atomic(
        &tmp.path().join("secrets/api-key"),
        "S3cret-api-key-rotated",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_file(&mnt.join("api-key")).unwrap() != "S3cret-api-key-rotated" {
        assert!(Instant::now() < deadline, "rotation not seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = m.stop();
    let log = tmp.path().join("audit.jsonl");
    let records = audit_records(&log);
    for kind in ["fetch", "mount", "read", "rotate", "unmount"] {
        assert!(
            records.iter().any(|r| r["event"] == kind),
            "no {kind} record"
        );
    }
    // The read by nobody names the process, its uid and the object version.
    let read = records
        .iter()
        .find(|r| {
            r["event"] == "read" && r["file"] == "db-password" && r["process"]["uid"] == NOBODY
        })
        .expect("read record of nobody's cat");
    assert_eq!(read["process"]["comm"], "cat");
    assert!(read["process"]["pid"].as_u64().unwrap() > 1);
    assert_eq!(read["object"], "db");
    assert!(read["version"].as_str().is_some_and(|v| !v.is_empty()));
    let rotate = records.iter().find(|r| r["event"] == "rotate").unwrap();
    assert_eq!(rotate["file"], "api-key");
    assert_ne!(rotate["version"], rotate["previous_version"]);
    assert_no_secrets(
        &[DB_PASS, API_KEY, "S3cret-api-key-rotated", RAW_TOKEN],
        &[&log],
        &[("logs", &logs)],
    );

    let verify = |what: &str| {
        let out = Command::new(BIN)
            .args(["audit", "verify"])
            .arg(&log)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            what.to_owned(),
        )
    };
    let (code, out, _) = verify("intact");
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let put = |ls: &[String]| {
        std::fs::write(
            &log,
            ls.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap()
    };

    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"outcome\":\"success\"", "\"outcome\":\"failure\"");
    assert_ne!(edited[2], lines[2]);
    put(&edited);
    let (code, out, _) = verify("edited");
    assert_eq!(code, Some(1));
    assert!(
        out.contains("line 4"),
        "edited line 3 is caught at line 4: {out}"
    );

    let mut deleted = lines.clone();
    deleted.remove(3);
    put(&deleted);
    let (code, out, _) = verify("deleted");
    assert_eq!(code, Some(1));
    assert!(out.contains("line 4") && out.contains("deleted"), "{out}");

    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    put(&reordered);
    let (code, out, _) = verify("reordered");
    assert_eq!(code, Some(1));
    assert!(out.contains("line 2"), "{out}");

    put(&lines[..lines.len() - 2]);
    let (code, out, _) = verify("truncated");
    assert_eq!(code, Some(1));
    assert!(out.contains("cut off the end"), "{out}");

    put(&lines);
    assert_eq!(verify("restored").0, Some(0));
}

#[test]
fn kill_9_then_mount_again_recovers_fuse_and_tmpfs() {
    require_root_and_fuse();
    for kind in ["fuse", "tmpfs"] {
        let tmp = open_tempdir();
        secrets_source(tmp.path());
        let cfg = config(tmp.path(), kind, "");
        let mnt = tmp.path().join("mnt");
        let m = Mounted::start(&cfg, &mnt, &[], "api-key");
        // A second keybroker on a live target is refused, naming the owner.
        let out = mount_output(&cfg, &mnt);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("already served by a running keybroker"),
            "{kind}"
        );
        m.kill9();
        if kind == "fuse" {
            let err = std::fs::read_dir(&mnt).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENOTCONN),
                "a killed FUSE server leaves a dead mount"
            );
        }
        let m = Mounted::start(&cfg, &mnt, &[], "api-key");
        assert_eq!(read_file(&mnt.join("api-key")).unwrap(), API_KEY);
        let logs = m.logs();
        assert!(
            logs.contains("found a mount left by a keybroker that is no longer running"),
            "{kind}: {logs}"
        );
        m.stop();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mi.contains(mnt.to_str().unwrap()),
            "{kind}: mounts pile up at the target"
        );
    }
}

/// `keybroker mount --config CFG MNT` run to its end (for the runs that are refused).
fn mount_output(cfg: &Path, mnt: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["mount", "--config"])
        .arg(cfg)
        .arg(mnt)
        .output()
        .unwrap()
}
