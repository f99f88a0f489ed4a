//! Helpers for tests that run the built `keybroker` binary against real mounts.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod azure;
pub mod bench;
pub mod cluster;
pub mod load;
pub mod node;
pub mod peers;
pub mod reader;

pub const BIN: &str = env!("CARGO_BIN_EXE_keybroker");

/// Tests here mount filesystems: they need root and /dev/fuse. In CI a missing prerequisite is a
/// failure, never a skip.
pub fn require_root_and_fuse() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount filesystems and must run as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: install fuse3 (scripts/install-peers.sh)"
    );
}

/// A temporary directory that other uids may traverse (tempfile makes 0700 directories).
pub fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("kb-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub struct Mounted {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Whether dropping this unmounts the target (off after a deliberate kill -9, whose dead
    /// mount the test wants to leave behind).
    cleanup: bool,
}

impl Mounted {
    /// Starts `keybroker mount` and waits until `ready_file` can be read in the mount.
    pub fn start(config: &Path, dir: &Path, extra: &[&str], ready_file: &str) -> Self {
        let log = config.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("mount")
            .arg("--config")
            .arg(config)
            .args(extra)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child,
            dir: dir.to_owned(),
            log,
            cleanup: true,
        };
        m.wait_ready(ready_file);
        m
    }

    fn wait_ready(&mut self, file: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // The process says when it has mounted (a volume left by a killed predecessor may be
            // readable before that).
            if self.logs().contains(": mounted ")
                && is_mount_point(&self.dir)
                && std::fs::read(self.dir.join(file)).is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("keybroker mount exited with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "mount not ready after 20 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_timeout(&mut self.child, Duration::from_secs(120));
        let logs = self.logs();
        assert!(
            status.success(),
            "keybroker mount did not exit cleanly ({status}):\n{logs}"
        );
        assert!(
            !is_mount_point(&self.dir),
            "still mounted after SIGTERM:\n{logs}"
        );
        logs
    }

    /// SIGKILL, leaving whatever the process had mounted in place.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.cleanup = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.cleanup {
            while is_mount_point(&self.dir) {
                if nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_mount_point(dir: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(&*dir))
}

/// Runs `cmd args` as `uid`/`gid` (a separate process, an unprivileged user) and returns
/// (success, stdout, stderr).
pub fn run_as(uid: u32, gid: u32, cmd: &str, args: &[&str]) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(cmd)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `path` atomically (as editors and config tools do).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes keybroker's bindings where the tests' daemons read them (`root/etc/bindings.yaml`).
pub fn write_bindings(root: &Path, yaml: &str) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/bindings.yaml"), yaml).unwrap();
}

/// Runs `cmd` to completion and asserts it succeeded (its stderr in the failure).
pub fn output_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Validates every record of the audit log files `files` against
/// docs/audit-record.schema.json (draft 2020-12, Python's jsonschema as scripts/install-peers.sh
/// pins it); returns how many records were checked.
pub fn assert_audit_schema(files: &[PathBuf]) -> u64 {
    const CHECK: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
v = Draft202012Validator(schema)
n, bad = 0, []
for path in sys.argv[2:]:
    for i, line in enumerate(open(path), 1):
        n += 1
        for e in v.iter_errors(json.loads(line)):
            bad.append(f"{path}:{i}: {e.message} at {list(e.absolute_path)}")
print(n)
print("\n".join(bad[:20]))
sys.exit(1 if bad else 0)
"#;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/audit-record.schema.json");
    let out = Command::new(peers::peers_python())
        .arg("-c")
        .arg(CHECK)
        .arg(&schema)
        .args(files)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "records that do not follow {}:\n{said}{}",
        schema.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    said.lines()
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Opens `page` (a local file) in headless Chromium, as a person's browser would, with the
/// network off (a network namespace of its own, no interface up): returns the document as the
/// browser built it, and with `screenshot` also keeps a picture of the page there. Chromium
/// (Debian's, pinned by scripts/install-peers.sh) must be there: a missing browser fails.
pub fn browser_dom(page: &Path, screenshot: Option<&Path>) -> String {
    let run = |what: &[String]| -> (std::process::ExitStatus, String) {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("unshare")
            .args(["--net", "--", "chromium"])
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--window-size=1280,2400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(what)
            .arg(format!("file://{}", page.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (scripts/install-peers.sh installs it)");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (wait_timeout(&mut child, Duration::from_secs(300)), out)
    };
    let (status, dom) = run(&["--dump-dom".to_string()]);
    assert!(status.success(), "chromium: {status}");
    if let Some(shot) = screenshot {
        if let Some(dir) = shot.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let (status, _) = run(&[format!("--screenshot={}", shot.display())]);
        assert!(
            status.success() && shot.exists(),
            "chromium screenshot: {status}"
        );
    }
    dom
}

/// Where tests keep what a person may want to look at afterwards (screenshots):
/// `target/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts")
}

/// Reads a whole file with one open, as an application would.
pub fn read_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

/// The audit log's text once `done` holds for it. The node's audit writer is a thread of its
/// own, so a record lands shortly after the reply or the log line it goes with; this reads
/// until it has (120 s is a deadline against a hang, not an expected time).
pub fn audit_text_when(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        if std::time::Instant::now() > deadline {
            let tail = text.len().saturating_sub(8000);
            let tail = (tail..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            panic!(
                "the audit log never showed {what}; its end:\n{}",
                &text[tail..]
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every audit record of a log, parsed.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    // A record being written as we read has no end of line yet: it is not a record yet.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that none of `secrets` occurs in any file under `files` (recursively, on their own
/// filesystem: mounts below them are not disk) or in `texts`.
pub fn assert_no_secrets(secrets: &[&str], files: &[&Path], texts: &[(&str, &str)]) {
    for f in files {
        let mut stack = vec![f.to_path_buf()];
        // Disk only: a volume's own tmpfs (the node's staging mounts live under its state
        // directory) holds the secret in memory, which is what it is for.
        use std::os::unix::fs::MetadataExt;
        let Ok(top) = std::fs::symlink_metadata(f) else {
            continue;
        };
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.dev() != top.dev() {
                continue;
            }
            if meta.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            } else if meta.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&bytes);
                for s in secrets {
                    assert!(!text.contains(s), "secret {s:?} found in {}", p.display());
                }
            }
        }
    }
    for (what, text) in texts {
        for s in secrets {
            assert!(!text.contains(s), "secret {s:?} found in {what}");
        }
    }
}

/// Polls `f` every 50 ms until it holds; fails the test naming `what` after `timeout`.
/// Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// A small tmpfs the test can fill up, unmounted however the test ends.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn new(dir: &Path, kib: usize) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("kb-test-audit"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={kib}k").as_str()),
        )
        .unwrap();
        SmallFs(dir.to_owned())
    }

    /// Writes a filler file until the filesystem is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    pub fn unfill(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
