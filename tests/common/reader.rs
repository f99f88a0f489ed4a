//! A reader in its own mount namespace (a container's view of a volume, through a bind mount of
//! the target): one open+read+close per millisecond, counting errors and the longest pause.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The reader: one open+read+close per millisecond until the stop file appears; prints its
/// counts, the longest single open+read+close, and the distinct contents it saw.
pub const READER: &str = r#"
import json, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
reads = errors = 0
worst = 0.0
first = []
seen = set()
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        with open(path, "rb") as f:
            seen.add(f.read().decode())
        reads += 1
    except OSError as e:
        errors += 1
        if len(first) < 5:
            first.append(repr(e))
    worst = max(worst, time.monotonic() - t)
    time.sleep(0.001)
print(json.dumps({"reads": reads, "errors": errors, "worst_ms": worst * 1000, "first": first, "seen": sorted(seen)}))
"#;

pub struct Reader {
    child: Option<Child>,
    stop: PathBuf,
}

impl Reader {
    /// Starts the reader in a new mount namespace where `target` is bind-mounted at `view`.
    pub fn start(target: &Path, view: &Path, stop: PathBuf) -> Self {
        std::fs::create_dir_all(view).unwrap();
        let _ = std::fs::remove_file(&stop);
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" || exit 9; exec python3 -c "$3" "$2/db" "$4""#)
            .arg("sh")
            .arg(target)
            .arg(view)
            .arg(READER)
            .arg(&stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            stop,
        }
    }

    pub fn finish(mut self) -> serde_json::Value {
        std::fs::write(&self.stop, "").unwrap();
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "reader failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::fs::write(&self.stop, "");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
