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
mod query;
mod report;
mod scan;
mod segments;
mod signing;
mod tail;
mod verify;
pub mod view;
mod writer;

pub use chain::{AuditKey, SCHEMA};
use chain::{Record, alg, head_mac, link};
pub use event::{Checkpoint, Event, EventKind, Outcome, PodRef, Pruned};
pub use query::{Filter, QueryReport, outside_pod, query};
pub use report::Report;
pub use segments::{Rotation, Segment, sealed_path, sealed_segments};
pub use signing::{PublicKey, SigningKey, key_id};
use tail::tail_state;
pub use verify::{ChainBreak, VerifyOptions, VerifyReport, verify, verify_reader};
use view::{RecordView, t};
use writer::{Msg, Writer};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Records queued for the writer thread before `record` blocks. std's bounded channel
/// allocates and initializes every slot up front (32 bytes each): 65,536 slots were 2 MiB
/// resident in every process; the writer drains thousands of records per millisecond, so a
/// burst larger than this only waits, it never loses a record.
const QUEUE: usize = 4096;
const HEAD_EVERY: Duration = Duration::from_millis(200);
/// How often records written since the last checkpoint get one (with a signing key).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

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

    /// Opens (or continues) the log at `path`, one file that never rotates. The chain
    /// continues from the last complete record; a torn tail (a crash in the middle of a
    /// write) is cut off and recorded. A log written with another key (or without one) is
    /// refused: the chain would break.
    pub fn open_keyed(
        path: &Path,
        fail_closed: bool,
        key: Option<AuditKey>,
    ) -> Result<Self, AuditError> {
        Self::open_with(
            path,
            AuditOptions {
                fail_closed,
                key,
                ..Default::default()
            },
        )
    }

    /// Opens (or continues) the log at `path` as [`Self::open_keyed`] does; with a
    /// `rotation`, the log is the active segment of sealed ones beside it (`segments`): a
    /// seal a crash interrupted is finished, an empty active segment continues the newest
    /// sealed one's chain, and retention runs once now.
    pub fn open_with(path: &Path, opts: AuditOptions) -> Result<Self, AuditError> {
        let AuditOptions {
            fail_closed,
            key,
            rotation,
            signing_key,
        } = opts;
        if key.is_some() && signing_key.is_some() {
            return Err(AuditError::Config(
                "--audit-key and --audit-signing-key exclude each other: an HMAC chain (verified with the secret key) or a SHA-256 chain with signed checkpoints (verified with the public key alone)".into(),
            ));
        }
        let err = |e: std::io::Error| AuditError::Open {
            path: path.to_owned(),
            error: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        if let Some(r) = &rotation {
            r.check().map_err(AuditError::Config)?;
            if segments::finish_interrupted_seal(path).map_err(err)? {
                tracing::warn!(log = %path.display(), "finished sealing a segment a crash interrupted (its seal record was written, its rename not)");
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let empty = file.metadata().map_err(err)?.len() == 0;
        let mut tail = tail_state(&mut file, key.as_ref()).map_err(err)?;
        if empty
            && rotation.is_some()
            && let Some(newest) = sealed_segments(path).map_err(err)?.pop()
        {
            // A new active segment: the chain goes on from the newest sealed one's last
            // record (its seal record).
            let (_, last) = segments::first_and_last_line(&newest.path).map_err(err)?;
            let info = segments::line_info(&last).ok_or_else(|| AuditError::Open {
                path: newest.path.clone(),
                error: "its last line is not an audit record; verify the log (keybroker audit verify) and move the damaged segment aside".into(),
            })?;
            tail.seq = info.seq + 1;
            tail.prev = link(key.as_ref(), &last);
            tail.last_time = info.time;
        }
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
        writer.active = rotation.map(|r| segments::Active::of(path, r, tail.seq));
        writer.signer = signing_key;
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
        // Retention as configured now (it may have changed since the last run).
        writer.prune();
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

    /// Records an event stamped with `time` instead of now (benchmarks build a month of log
    /// in seconds; the daemon always records at the moment of the event).
    #[doc(hidden)]
    pub fn record_at(&self, time: SystemTime, event: Event) {
        if self.tx.send(Msg::Event(time, Box::new(event))).is_err() {
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

    /// Writes everything queued and, with a signing key, a checkpoint signing it (at a clean
    /// shutdown: nothing is left unsigned).
    pub fn checkpoint(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Checkpoint(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Writes everything queued, then nothing more: a newer process has taken the log over
    /// (a handover). Records after this are logged as errors and not written.
    pub fn seal(&self) {
        self.close_for(writer::Closing::HandedOver);
    }

    /// At a clean shutdown: writes everything queued, signs it (with a signing key), anchors
    /// the head on the last record, then writes nothing more, so that a record made while the
    /// process exits cannot land after the head anchor (it is logged as an error instead).
    pub fn close(&self) {
        self.close_for(writer::Closing::Stopped);
    }

    fn close_for(&self, why: writer::Closing) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Close(why, tx)).is_ok() {
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

/// How a log is opened ([`AuditLog::open_with`]).
#[derive(Default)]
pub struct AuditOptions {
    /// Refuse to serve while the log cannot be written.
    pub fail_closed: bool,
    /// Key the chain (HMAC-SHA256).
    pub key: Option<AuditKey>,
    /// Seal segments and keep them as this says (`None`: one file forever).
    pub rotation: Option<Rotation>,
    /// Sign checkpoints and the head anchor (Ed25519). Not with `key`: a keyed chain cannot
    /// be checked without the secret, which is what public-key verification avoids.
    pub signing_key: Option<Arc<SigningKey>>,
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
    #[error("audit log settings: {0}")]
    Config(String),
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
                beyond_head: 0,
                segments: 1,
                ..Default::default()
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
                beyond_head: 0,
                segments: 1,
                ..Default::default()
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
            ..Default::default()
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
                beyond_head: 0,
                segments: 1,
                ..Default::default()
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
                beyond_head: 0,
                segments: 1,
                ..Default::default()
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

    /// docs/audit-record.schema.json and the code name the same events, outcomes and
    /// version (the e2e tests validate what the node writes against the schema itself).
    #[test]
    fn the_documented_schema_names_every_event_and_outcome() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/audit-record.schema.json")).unwrap();
        assert_eq!(schema["properties"]["schema"]["const"], SCHEMA);
        let listed = |field: &str| -> Vec<String> {
            schema["properties"][field]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        // A new kind does not compile here until it is listed (and so documented).
        let kinds = [
            EventKind::Mount,
            EventKind::Unmount,
            EventKind::Fetch,
            EventKind::Renew,
            EventKind::Rotate,
            EventKind::Deny,
            EventKind::Read,
            EventKind::Error,
            EventKind::Gap,
            EventKind::Seal,
            EventKind::Prune,
            EventKind::Checkpoint,
        ];
        for k in kinds {
            match k {
                EventKind::Mount
                | EventKind::Unmount
                | EventKind::Fetch
                | EventKind::Renew
                | EventKind::Rotate
                | EventKind::Deny
                | EventKind::Read
                | EventKind::Error
                | EventKind::Gap
                | EventKind::Seal
                | EventKind::Prune
                | EventKind::Checkpoint => {}
            }
        }
        let names: Vec<String> = kinds
            .iter()
            .map(|k| {
                serde_json::to_value(k)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names, listed("event"));
        let outcomes: Vec<String> = [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Denied,
            Outcome::Stale,
        ]
        .iter()
        .map(|o| {
            serde_json::to_value(o)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        assert_eq!(outcomes, listed("outcome"));
        // Every record names the version.
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1);
        let rec: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(rec["schema"], SCHEMA);
    }

    fn rotating(dir: &Path, retain_bytes: Option<u64>) -> (PathBuf, AuditLog) {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open_with(
            &path,
            AuditOptions {
                rotation: Some(Rotation {
                    max_segment_bytes: 4096,
                    max_segment_age: Duration::from_secs(3600),
                    retain_bytes,
                    retain_age: None,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        (path, log)
    }

    fn fill(log: &AuditLog, n: usize) {
        for i in 0..n {
            log.record(
                Event::new(EventKind::Read)
                    .object(format!("object-{i}"))
                    .file("password")
                    .version("0123456789abcdef"),
            );
            if i % 10 == 9 {
                // Batches of ten: the writer seals between writes.
                log.flush();
            }
        }
        log.flush();
    }

    fn names(path: &Path) -> Vec<PathBuf> {
        sealed_segments(path)
            .unwrap()
            .into_iter()
            .map(|s| s.path)
            .collect()
    }

    #[test]
    fn segments_keep_one_chain_and_a_restart_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log) = rotating(dir.path(), None);
        fill(&log, 300);
        drop(log);
        let segs = names(&path);
        assert!(segs.len() >= 5, "{segs:?}");
        let r = verify(&path, &opts(None)).unwrap().unwrap();
        assert_eq!(r.segments, segs.len() as u64 + 1);
        assert_eq!(r.records, 300 + segs.len() as u64, "every seal is a record");
        assert_eq!(r.pruned_through, None);
        // Each sealed segment ends with its own seal record.
        for s in &segs {
            let text = std::fs::read_to_string(s).unwrap();
            let last: serde_json::Value =
                serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(last["event"], "seal");
            assert_eq!(
                last["segment"].as_str().unwrap(),
                s.file_name().unwrap().to_str().unwrap()
            );
        }
        // A restart goes on in the same chain.
        let (_, log) = rotating(dir.path(), None);
        fill(&log, 50);
        drop(log);
        assert!(verify(&path, &opts(None)).unwrap().is_ok());
    }

    #[test]
    fn tampering_with_segments_is_found_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log) = rotating(dir.path(), None);
        fill(&log, 300);
        drop(log);
        let segs = names(&path);
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let saved: Vec<Vec<u8>> = segs.iter().map(|s| std::fs::read(s).unwrap()).collect();
        let restore = || {
            for (s, b) in segs.iter().zip(&saved) {
                std::fs::write(s, b).unwrap();
            }
        };
        let broken = || verify(&path, &opts(None)).unwrap().unwrap_err();

        // A middle segment deleted.
        std::fs::remove_file(&segs[2]).unwrap();
        let b = broken();
        assert_eq!(b.file, name(&segs[3]));
        assert!(b.reason.contains("a segment was deleted"), "{b}");
        restore();

        // A sealed segment truncated (its seal record cut off).
        let text = String::from_utf8(saved[1].clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(
            &segs[1],
            format!("{}\n", lines[..lines.len() - 1].join("\n")),
        )
        .unwrap();
        let b = broken();
        assert_eq!(b.file, name(&segs[1]));
        assert!(
            b.reason.contains("does not end with its seal record"),
            "{b}"
        );
        restore();

        // Two segments swapped by renaming.
        let tmp = dir.path().join("swap");
        std::fs::rename(&segs[1], &tmp).unwrap();
        std::fs::rename(&segs[2], &segs[1]).unwrap();
        std::fs::rename(&tmp, &segs[2]).unwrap();
        let b = broken();
        assert_eq!(b.file, name(&segs[1]));
        assert!(b.reason.contains("renamed or reordered"), "{b}");
        restore();

        // A record edited inside a sealed segment: the line after it breaks.
        std::fs::write(
            &segs[3],
            String::from_utf8(saved[3].clone())
                .unwrap()
                .replacen("object-", "objeXt-", 1),
        )
        .unwrap();
        let b = broken();
        assert_eq!((b.file.as_str(), b.line), (name(&segs[3]).as_str(), 2));
        restore();

        // The oldest segment deleted with nothing to say it was pruned.
        std::fs::remove_file(&segs[0]).unwrap();
        let b = broken();
        assert_eq!(b.file, name(&segs[1]));
        assert!(b.reason.contains("no prune record names them"), "{b}");
        restore();

        assert!(verify(&path, &opts(None)).unwrap().is_ok());
    }

    #[test]
    fn retention_prunes_oldest_segments_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log) = rotating(dir.path(), Some(3 * 4096));
        fill(&log, 400);
        drop(log);
        let segs = names(&path);
        assert!(!segs.is_empty() && segs.len() <= 3, "{segs:?}");
        let r = verify(&path, &opts(None)).unwrap().unwrap();
        let through = r.pruned_through.expect("the start is explained by pruning");
        assert_eq!(sealed_segments(&path).unwrap()[0].first_seq, through + 1);
        let prunes: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .chain(
                segs.iter()
                    .flat_map(|s| {
                        std::fs::read_to_string(s)
                            .unwrap()
                            .lines()
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
            )
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "prune")
            .collect();
        assert!(!prunes.is_empty());
        // A pruned log whose prune record claims another start is a deletion.
        std::fs::remove_file(&segs[0]).unwrap();
        if segs.len() > 1 {
            let b = verify(&path, &opts(None)).unwrap().unwrap_err();
            assert!(b.reason.contains("no prune record"), "{b}");
        }
    }

    #[test]
    fn a_seal_cut_short_by_a_crash_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log) = rotating(dir.path(), None);
        fill(&log, 100);
        drop(log);
        // The crash: the newest segment's seal record is written, its rename not done (and
        // so no active file yet).
        let newest = names(&path).pop().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(&newest, &path).unwrap();
        // ... its head anchor names the seal record, the last one written.
        let text = std::fs::read_to_string(&path).unwrap();
        let seal = text.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(seal).unwrap();
        std::fs::write(
            head_path(&path),
            serde_json::json!({"seq": v["seq"], "hash": hex::encode(Sha256::digest(seal.as_bytes())), "alg": "sha256"}).to_string(),
        )
        .unwrap();
        assert!(
            verify(&path, &opts(None)).unwrap().is_ok(),
            "consistent as the crash left it"
        );
        let (_, log) = rotating(dir.path(), None);
        assert!(newest.exists(), "the rename is finished");
        fill(&log, 20);
        drop(log);
        assert!(verify(&path, &opts(None)).unwrap().is_ok());
    }

    fn signer() -> Arc<SigningKey> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Arc::new(SigningKey::from_pkcs8(doc.as_ref()).unwrap())
    }

    fn signed_log(path: &Path, key: &Arc<SigningKey>, n: usize) {
        let log = AuditLog::open_with(
            path,
            AuditOptions {
                signing_key: Some(key.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..n {
            log.record(Event::new(EventKind::Read).object(format!("obj{i}")));
        }
        // As a clean shutdown does.
        log.checkpoint();
    }

    fn with_keys(keys: &[&Arc<SigningKey>]) -> VerifyOptions {
        VerifyOptions {
            public_keys: keys.iter().map(|k| k.public()).collect(),
            ..Default::default()
        }
    }

    /// What someone with the public key alone can do: edit a line and re-chain every line
    /// after it with SHA-256, and rewrite the head anchor to match.
    fn rechain_from(path: &Path, edited: usize, edit: impl Fn(&str) -> String) {
        let mut l = lines(path);
        l[edited] = edit(&l[edited]);
        for i in edited + 1..l.len() {
            let mut v: serde_json::Value = serde_json::from_str(&l[i]).unwrap();
            v["prev"] = hex::encode(Sha256::digest(l[i - 1].as_bytes())).into();
            l[i] = serde_json::to_string(&v).unwrap();
        }
        let last = l.last().unwrap().clone();
        let seq = l.len() - 1;
        put(path, &l);
        let mut head: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(head_path(path)).unwrap()).unwrap();
        head["seq"] = seq.into();
        head["hash"] = hex::encode(Sha256::digest(last.as_bytes())).into();
        std::fs::write(head_path(path), head.to_string()).unwrap();
    }

    #[test]
    fn signed_checkpoints_verify_with_the_public_key_and_resist_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signed.jsonl");
        let key = signer();
        signed_log(&path, &key, 5);
        let r = verify(&path, &with_keys(&[&key])).unwrap().unwrap();
        assert!(r.checkpoints >= 1 && r.after_last_checkpoint == 0, "{r:?}");
        let orig = lines(&path);
        let head = std::fs::read_to_string(head_path(&path)).unwrap();
        // A record edited and the chain redone: the checkpoint's signed link no longer holds.
        rechain_from(&path, 2, |l| l.replace("obj2", "objX"));
        let b = verify(&path, &opts(None)).unwrap();
        assert!(b.is_ok(), "a plain chain alone cannot tell: {b:?}");
        let b = verify(&path, &with_keys(&[&key])).unwrap().unwrap_err();
        assert!(b.reason.contains("checkpoint"), "{b}");
        // A checkpoint's signature altered.
        put(&path, &orig);
        std::fs::write(head_path(&path), &head).unwrap();
        let cp = orig
            .iter()
            .position(|l| l.contains("\"checkpoint\""))
            .unwrap();
        rechain_from(&path, cp, |l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let sig = v["checkpoint"]["signature"].as_str().unwrap().to_owned();
            let flipped = if sig.starts_with('0') { "1" } else { "0" };
            v["checkpoint"]["signature"] = format!("{flipped}{}", &sig[1..]).into();
            serde_json::to_string(&v).unwrap()
        });
        let b = verify(&path, &with_keys(&[&key])).unwrap().unwrap_err();
        assert!(b.reason.contains("does not verify"), "{b}");
        // Records appended and the head rewritten: the head's signature fails.
        put(&path, &orig);
        std::fs::write(head_path(&path), &head).unwrap();
        forge_append(&path);
        rechain_from(&path, orig.len(), |l| l.to_owned());
        let b = verify(&path, &with_keys(&[&key])).unwrap().unwrap_err();
        assert!(b.reason.contains("head anchor"), "{b}");
        // Another key: named as not given.
        put(&path, &orig);
        std::fs::write(head_path(&path), &head).unwrap();
        let other = signer();
        let b = verify(&path, &with_keys(&[&other])).unwrap().unwrap_err();
        assert!(b.reason.contains("not among the public keys"), "{b}");
        // An unsigned log has nothing the keys can vouch for.
        let plain = write_log(dir.path(), 3);
        let b = verify(&plain, &with_keys(&[&key])).unwrap().unwrap_err();
        assert!(b.reason.contains("no signed checkpoint"), "{b}");
    }

    #[test]
    fn a_key_rotation_verifies_with_both_public_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotated.jsonl");
        let (a, b) = (signer(), signer());
        signed_log(&path, &a, 3);
        signed_log(&path, &b, 3);
        let r = verify(&path, &with_keys(&[&a, &b])).unwrap().unwrap();
        assert!(r.checkpoints >= 2, "{r:?}");
        let e = verify(&path, &with_keys(&[&b])).unwrap().unwrap_err();
        assert!(e.reason.contains(a.id()), "{e}");
        // An HMAC key and a signing key exclude each other.
        let e = AuditLog::open_with(
            &dir.path().join("both.jsonl"),
            AuditOptions {
                key: Some(AuditKey::from_bytes(&[1; 32])),
                signing_key: Some(a.clone()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("exclude each other"), "{e}");
    }

    /// Producers as fast as the writer (found by a benchmark writing 400,000 records): every
    /// record is written, none dropped as if the log were unwritable.
    #[test]
    fn a_sustained_burst_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("burst.jsonl");
        let log = AuditLog::open(&path, false).unwrap();
        let detail = "x".repeat(200);
        let n = 60_000;
        for i in 0..n {
            log.record(
                Event::new(EventKind::Read)
                    .object(format!("obj{i}"))
                    .detail(detail.clone()),
            );
        }
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("audit gap"), "records were dropped");
        assert_eq!(text.lines().count(), n);
        assert!(verify(&path, &opts(None)).unwrap().is_ok());
    }

    /// A clean shutdown (CI found records after the head anchor): a seal due at the close
    /// happens before the last checkpoint, the head names that checkpoint, and a record made
    /// while the process exits is not written after it.
    #[test]
    fn nothing_follows_the_head_once_the_log_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("closed.jsonl");
        let key = signer();
        let log = AuditLog::open_with(
            &path,
            AuditOptions {
                signing_key: Some(key.clone()),
                // Every write finds the segment due: a seal is due at the close too.
                rotation: Some(Rotation {
                    max_segment_bytes: 1 << 20,
                    max_segment_age: Duration::from_nanos(1),
                    retain_bytes: None,
                    retain_age: None,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..5 {
            log.record(Event::new(EventKind::Read).object(format!("obj{i}")));
            log.flush();
        }
        log.record(Event::new(EventKind::Read).object("last"));
        log.close();
        log.record(Event::new(EventKind::Read).object("late"));
        log.flush();
        let r = verify(&path, &with_keys(&[&key])).unwrap().unwrap();
        assert!(r.segments > 1, "{r:?}");
        assert_eq!(r.beyond_head, 0, "{r:?}");
        assert_eq!(r.after_last_checkpoint, 0, "{r:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("late"), "{text}");
        assert!(
            text.lines().last().unwrap().contains("checkpoint"),
            "{text}"
        );
    }

    /// Segments scanned on several cores, lines the filter cannot match not parsed: the same
    /// records, in the same order, as one record at a time (and as parsing every line), and a
    /// skipped line that was edited is found at the same place.
    #[test]
    fn a_query_on_every_core_finds_what_one_record_at_a_time_finds() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log) = rotating(dir.path(), None);
        fill(&log, 600);
        drop(log);
        let segs = names(&path);
        assert!(segs.len() >= 8, "{segs:?}");
        let run = |f: &Filter, threads: usize| {
            let mut got = Vec::new();
            let r = query(&path, &opts(None), f, threads, &mut |_, line| {
                got.push(String::from_utf8(line.to_vec()).unwrap())
            })
            .unwrap();
            (r, got)
        };
        let mut all: Vec<String> = segs.iter().flat_map(|s| lines(s)).collect();
        all.extend(lines(&path));
        let filters = [
            // Everything: more than a scan keeps per file (read again in its turn).
            Filter::default(),
            Filter {
                object: Some("object-17".into()),
                ..Default::default()
            },
            Filter {
                object: Some("object-1*".into()),
                file: Some("password".into()),
                ..Default::default()
            },
            Filter {
                event: Some("seal".into()),
                ..Default::default()
            },
            Filter {
                pod: Some(String::new()),
                outcome: Some("success".into()),
                ..Default::default()
            },
        ];
        for f in &filters {
            let want: Vec<&String> = all
                .iter()
                .filter(|l| f.matches(&RecordView::parse(l.as_bytes()).unwrap()))
                .collect();
            let (one, got_one) = run(f, 1);
            let (many, got_many) = run(f, 4);
            assert!(!want.is_empty(), "{f:?}");
            assert_eq!(got_one.iter().collect::<Vec<_>>(), want, "{f:?}");
            assert_eq!(got_many, got_one, "{f:?}");
            assert_eq!(
                (one.read, one.matched, one.segments_read),
                (many.read, many.matched, many.segments_read)
            );
            assert_eq!(one.read, all.len() as u64);
            assert!(matches!(one.verified, Ok(Some(_))), "{:?}", one.verified);
            assert!(matches!(many.verified, Ok(Some(_))), "{:?}", many.verified);
        }
        // A line no filter asks for, edited in a middle segment: its hash no longer links.
        let mid = &segs[segs.len() / 2];
        let mut l = lines(mid);
        assert!(!l[2].contains("object-17\""));
        l[2] = l[2].replace("object-", "object_");
        put(mid, &l);
        let name = mid.file_name().unwrap().to_string_lossy().into_owned();
        for threads in [1, 4] {
            let (r, got) = run(&filters[2], threads);
            let b = r.verified.unwrap_err();
            assert_eq!((b.file.as_str(), b.line), (name.as_str(), 4), "{b}");
            assert!(b.reason.contains("hash of the previous record"), "{b}");
            assert!(got.iter().all(|g| !g.contains("object_")), "{got:?}");
        }
    }
}
