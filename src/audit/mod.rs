//! The audit log: JSON lines, one record per event, each carrying a link to the line before it
//! (`prev`), so that an edited, deleted, reordered or truncated record breaks the chain.
//!
//! - Producers (FUSE threads, the refresher, the CLI) only enqueue; one writer thread stamps
//!   `seq`, `time` and `prev` and writes.
//! - Next to the log the writer keeps `<log>.head` (the last sequence number and link it wrote)
//!   so that cutting records off the end is detected too.
//! - With a key ([`AuditKey`]) the link is an HMAC-SHA256 and the head carries a MAC: forging,
//!   truncating or re-chaining then needs the key. Without one the link is a SHA-256 that
//!   anyone who can write the files can recompute (docs/SECURITY.md says what each detects).
//! - A write that fails (full disk, read-only file) is cut back to the last whole record and
//!   retried; records wait in memory meanwhile (bounded: past the bound they are dropped and a
//!   gap record says so). [`AuditLog::healthy`] turns false at the first failure and true again
//!   at the first success, which is what fail-closed serving follows.
//! - A torn tail left by a crash is cut off at the next start and the cut is recorded, so the
//!   chain goes on verifiably. [`verify`] checks a log offline.
//!
//! Records never contain secret values: the types here carry names, versions and fingerprints
//! only, and there is no field a value could be put in.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::procinfo::ProcessRef;

mod chain;
mod event;
mod tail;
mod verify;
mod writer;

pub use chain::AuditKey;
use chain::{Record, alg, head_mac, link};
pub use event::{Event, EventKind, Outcome, PodRef};
use tail::tail_state;
pub use verify::{ChainBreak, VerifyOptions, VerifyReport, verify, verify_reader};
use writer::{Msg, Writer};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Records queued for the writer thread before `record` blocks. std's bounded channel
/// allocates and initializes every slot up front (32 bytes each): 65,536 slots were 2 MiB
/// resident in every process; the writer drains thousands of records per millisecond, so a
/// burst larger than this only waits, it never loses a record.
const QUEUE: usize = 4096;
const HEAD_EVERY: Duration = Duration::from_millis(200);

/// What producers and the node's health endpoints see of the writer.
#[derive(Debug, Default)]
struct Health {
    /// False from a failed write until a write succeeds again.
    broken: AtomicBool,
    write_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A handle to the audit log. Cloning is cheap; the writer thread ends when the last handle is
/// dropped (after writing everything queued).
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    health: Arc<Health>,
    fail_closed: bool,
    /// When the previous writer of this log wrote its last record (None: a new log).
    previous_last: Option<Arc<str>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .field("fail_closed", &self.fail_closed)
            .finish()
    }
}

impl AuditLog {
    /// Opens (or continues) the log at `path` with a plain SHA-256 chain.
    pub fn open(path: &Path, fail_closed: bool) -> Result<Self, AuditError> {
        Self::open_keyed(path, fail_closed, None)
    }

    /// Opens (or continues) the log at `path`. The chain continues from the last complete
    /// record; a torn tail (a crash in the middle of a write) is cut off and recorded.
    /// A log written with another key (or without one) is refused: the chain would break.
    pub fn open_keyed(
        path: &Path,
        fail_closed: bool,
        key: Option<AuditKey>,
    ) -> Result<Self, AuditError> {
        let err = |e: std::io::Error| AuditError::Open {
            path: path.to_owned(),
            error: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let tail = tail_state(&mut file, key.as_ref()).map_err(err)?;
        if !tail.chain_matches {
            return Err(AuditError::KeyMismatch {
                path: path.to_owned(),
            });
        }
        if let Ok(head) = std::fs::read_to_string(head_path(path))
            && let Some(a) = serde_json::from_str::<serde_json::Value>(&head)
                .ok()
                .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned))
            && a != alg(key.as_ref())
        {
            return Err(AuditError::KeyMismatch {
                path: path.to_owned(),
            });
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let health = Arc::new(Health::default());
        let previous_last = tail.last_time.as_deref().map(Arc::from);
        let good_len = file.seek(SeekFrom::End(0)).map_err(err)?;
        let mut writer = Writer::new(
            file,
            Some(head_path(path)),
            key,
            good_len,
            tail.seq,
            tail.prev,
            health.clone(),
        );
        if let Some(torn) = tail.torn {
            tracing::warn!(
                bytes = torn.bytes,
                "the audit log ended in an incomplete record (a crash during a write); it was cut off and the cut is recorded"
            );
            writer.write(
                SystemTime::now(),
                &Event::new(EventKind::Error)
                    .outcome(Outcome::Failure)
                    .detail(format!(
                        "audit log tail torn: {} bytes after record {} were not a complete record and were cut off at restart (sha256 {})",
                        torn.bytes,
                        tail.seq as i64 - 1,
                        torn.sha256
                    )),
            );
        }
        Self::start(writer, tx, rx, health, fail_closed, previous_last).map_err(err)
    }

    /// Starts `writer`'s thread; the handle sends it records through `tx`.
    fn start(
        writer: Writer,
        tx: SyncSender<Msg>,
        rx: Receiver<Msg>,
        health: Arc<Health>,
        fail_closed: bool,
        previous_last: Option<Arc<str>>,
    ) -> std::io::Result<Self> {
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx,
            health,
            fail_closed,
            previous_last,
        })
    }

    /// The `time` of the last record a previous process wrote to this log, if any.
    pub fn previous_last_time(&self) -> Option<&str> {
        self.previous_last.as_deref()
    }

    /// An audit log written to standard output as JSON lines (for a pod, whose log pipeline
    /// keeps them): the same chained records, no head anchor (a stream cannot be cut back;
    /// the chain still shows edits and gaps), starting at sequence 0.
    pub fn stdout(fail_closed: bool) -> Result<Self, AuditError> {
        use std::os::fd::AsFd;
        let err = |e: std::io::Error| AuditError::Open {
            path: PathBuf::from("-"),
            error: e.to_string(),
        };
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(err)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let health = Arc::new(Health::default());
        let writer = Writer::new(
            File::from(fd),
            None,
            None,
            0,
            0,
            GENESIS.to_owned(),
            health.clone(),
        );
        Self::start(writer, tx, rx, health, fail_closed, None).map_err(err)
    }

    /// Records an event. Blocks when the queue is full: audit records are never dropped.
    pub fn record(&self, event: Event) {
        if self
            .tx
            .send(Msg::Event(SystemTime::now(), Box::new(event)))
            .is_err()
        {
            self.health.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until everything queued so far is written and flushed (or failed to be).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Writes everything queued, then nothing more: a newer process has taken the log over
    /// (a handover). Records after this are logged as errors and not written.
    pub fn seal(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Seal(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// False while the log cannot be written (from a failed write until one succeeds again).
    pub fn healthy(&self) -> bool {
        !self.health.broken.load(Ordering::Relaxed)
    }

    /// Failed write attempts over the process's life (retries count).
    pub fn write_errors(&self) -> u64 {
        self.health.write_errors.load(Ordering::Relaxed)
    }

    /// Why the last write failed (an I/O error; never a record's content).
    pub fn last_error(&self) -> String {
        self.health
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "unknown error".into())
    }

    /// Whether new secrets may be served: always, unless fail-closed is on and the log is
    /// not writable right now.
    pub fn may_serve(&self) -> bool {
        !self.fail_closed || self.healthy()
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }
}

pub fn head_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {error}")]
    Open { path: PathBuf, error: String },
    #[error("cannot read the audit key {path}: {error}")]
    Key { path: PathBuf, error: String },
    #[error(
        "the audit log {path} was written with a different chain key (or with/without one): continuing it would break its chain; use the same key, or start a new log file"
    )]
    KeyMismatch { path: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path, false).unwrap();
        for i in 0..n {
            log.record(
                Event::new(EventKind::Fetch)
                    .object(format!("obj{i}"))
                    .version("v1"),
            );
        }
        log.flush();
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn put(path: &Path, lines: &[String]) {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn an_intact_log_verifies_and_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        assert_eq!(
            verify(&path, &VerifyOptions::default()).unwrap(),
            Ok(VerifyReport {
                records: 3,
                anchored: true,
                beyond_head: 0
            })
        );
        let log = AuditLog::open(&path, false).unwrap();
        log.record(Event::new(EventKind::Unmount));
        log.flush();
        assert_eq!(
            verify(&path, &VerifyOptions::default()).unwrap(),
            Ok(VerifyReport {
                records: 4,
                anchored: true,
                beyond_head: 0
            })
        );
        let last: serde_json::Value = serde_json::from_str(&lines(&path)[3]).unwrap();
        assert_eq!(last["event"], "unmount");
        assert_eq!(last["seq"], 3);
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5);
        let orig = lines(&path);

        let mut edited = orig.clone();
        edited[1] = edited[1].replace("obj1", "objX");
        put(&path, &edited);
        assert_eq!(
            verify(&path, &VerifyOptions::default())
                .unwrap()
                .unwrap_err()
                .line,
            3
        );

        let mut deleted = orig.clone();
        deleted.remove(2);
        put(&path, &deleted);
        let e = verify(&path, &VerifyOptions::default())
            .unwrap()
            .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("deleted"), "{e}");

        let mut reordered = orig.clone();
        reordered.swap(1, 2);
        put(&path, &reordered);
        assert_eq!(
            verify(&path, &VerifyOptions::default())
                .unwrap()
                .unwrap_err()
                .line,
            2
        );

        put(&path, &orig[..3]);
        let e = verify(&path, &VerifyOptions::default())
            .unwrap()
            .unwrap_err();
        assert!(e.reason.contains("cut off the end"), "{e}");

        let mut torn = orig.join("\n");
        torn.truncate(torn.len() - 5);
        std::fs::write(&path, torn).unwrap();
        let e = verify(&path, &VerifyOptions::default())
            .unwrap()
            .unwrap_err();
        assert_eq!(e.line, 5);

        let mut last_edited = orig.clone();
        last_edited[4] = last_edited[4].replace("obj4", "objY");
        put(&path, &last_edited);
        let e = verify(&path, &VerifyOptions::default())
            .unwrap()
            .unwrap_err();
        assert!(e.reason.contains("head anchor"), "{e}");

        put(&path, &orig);
        assert!(verify(&path, &VerifyOptions::default()).unwrap().is_ok());
    }

    fn keyed_log(dir: &Path, n: usize, key: &AuditKey) -> PathBuf {
        let path = dir.join("keyed.jsonl");
        let log = AuditLog::open_keyed(&path, false, Some(key.clone())).unwrap();
        for i in 0..n {
            log.record(Event::new(EventKind::Fetch).object(format!("obj{i}")));
        }
        log.flush();
        path
    }

    fn opts(key: Option<&AuditKey>) -> VerifyOptions {
        VerifyOptions {
            key: key.cloned(),
            allow_missing_head: false,
        }
    }

    #[test]
    fn a_missing_head_fails_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5);
        std::fs::remove_file(head_path(&path)).unwrap();
        put(&path, &lines(&path)[..2]);
        let e = verify(&path, &opts(None)).unwrap().unwrap_err();
        assert!(e.reason.contains("head anchor"), "{e}");
        let allowed = VerifyOptions {
            allow_missing_head: true,
            ..Default::default()
        };
        assert!(verify(&path, &allowed).unwrap().is_ok());
    }

    /// A record chained correctly with SHA-256 and appended without touching the head.
    fn forge_append(path: &Path) {
        let mut l = lines(path);
        let prev = hex::encode(Sha256::digest(l.last().unwrap().as_bytes()));
        l.push(format!(
            r#"{{"seq":{},"time":"2026-01-01T00:00:00Z","event":"read","outcome":"success","prev":"{prev}"}}"#,
            l.len()
        ));
        put(path, &l);
    }

    #[test]
    fn appended_forgeries_are_found_and_a_key_stops_re_chaining() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        forge_append(&path);
        let e = verify(&path, &opts(None)).unwrap().unwrap_err();
        assert!(
            e.reason.contains("follow the record the head anchor"),
            "{e}"
        );

        let key = AuditKey::from_bytes(&[7u8; 32]);
        let path = keyed_log(dir.path(), 4, &key);
        assert_eq!(
            verify(&path, &opts(Some(&key))).unwrap(),
            Ok(VerifyReport {
                records: 4,
                anchored: true,
                beyond_head: 0
            })
        );
        // Without the key the verifier is told to use one.
        let e = verify(&path, &opts(None)).unwrap().unwrap_err();
        assert!(e.reason.contains("--key"), "{e}");
        // A wrong key fails.
        let wrong = AuditKey::from_bytes(&[8u8; 32]);
        assert!(verify(&path, &opts(Some(&wrong))).unwrap().is_err());
        // An appended record chained with SHA-256 (no key) is found.
        let orig = lines(&path);
        forge_append(&path);
        let e = verify(&path, &opts(Some(&key))).unwrap().unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        // Truncation with a rewritten head (hash taken from the cut record's prev) is found.
        put(&path, &orig[..2]);
        let cut_prev: serde_json::Value = serde_json::from_str(&orig[2]).unwrap();
        std::fs::write(
            head_path(&path),
            serde_json::json!({"seq": 1, "hash": cut_prev["prev"], "alg": "hmac-sha256", "mac": "00"})
                .to_string(),
        )
        .unwrap();
        let e = verify(&path, &opts(Some(&key))).unwrap().unwrap_err();
        assert!(e.reason.contains("MAC"), "{e}");
        // Continuing a keyed log without the key (or with another) is refused.
        put(&path, &orig);
        assert!(matches!(
            AuditLog::open(&path, false),
            Err(AuditError::KeyMismatch { .. })
        ));
        assert!(matches!(
            AuditLog::open_keyed(&path, false, Some(wrong)),
            Err(AuditError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn a_torn_tail_is_cut_recorded_and_the_sequence_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 4);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(br#"{"seq":4,"time":"2026-"#);
        std::fs::write(&path, &text).unwrap();
        assert!(verify(&path, &opts(None)).unwrap().is_err());
        let log = AuditLog::open(&path, false).unwrap();
        log.record(Event::new(EventKind::Mount));
        log.flush();
        assert_eq!(
            verify(&path, &opts(None)).unwrap(),
            Ok(VerifyReport {
                records: 6,
                anchored: true,
                beyond_head: 0
            })
        );
        let l = lines(&path);
        let tear: serde_json::Value = serde_json::from_str(&l[4]).unwrap();
        assert_eq!(tear["seq"], 4);
        let detail = tear["detail"].as_str().unwrap();
        assert!(
            detail.contains("torn") && detail.contains("22 bytes"),
            "{detail}"
        );
        let next: serde_json::Value = serde_json::from_str(&l[5]).unwrap();
        assert_eq!(next["seq"], 5);
    }
}
