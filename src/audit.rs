//! The audit log: JSON lines, one record per event, each carrying the SHA-256 of the line before
//! it, so that an edited, deleted, reordered or truncated record breaks the chain.
//!
//! Producers (FUSE threads, the refresher, the CLI) only enqueue; one writer thread stamps
//! `seq`, `time` and `prev`, writes and flushes. Next to the log
//! the writer keeps `<log>.head` (the last sequence number and hash it wrote) so that cutting
//! records off the end is detected too. [`verify`] checks a log offline.
//!
//! Records never contain secret values: the types here carry names, versions and fingerprints
//! only, and there is no field a value could be put in.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::procinfo::ProcessRef;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const QUEUE: usize = 65_536;
const HEAD_EVERY: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Mount,
    Unmount,
    Fetch,
    Renew,
    Rotate,
    Deny,
    Read,
    Error,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Success,
    Failure,
    Denied,
    /// A refresh failed and the last good value is still served.
    Stale,
}

/// The pod an event belongs to (node mode).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// One event as a producer describes it; the writer adds `seq`, `time` and `prev`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: Option<EventKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Context for an operator (e.g. "recovered after a restart").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessRef>,
    /// For coalesced reads: how many opens this record stands for (absent: one) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// ... the first of which happened at this time (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
}

impl Event {
    pub fn new(kind: EventKind) -> Self {
        Self {
            event: Some(kind),
            ..Self::default()
        }
    }
    pub fn volume(mut self, v: impl Into<String>) -> Self {
        self.volume = Some(v.into());
        self
    }
    pub fn provider(mut self, v: impl Into<String>) -> Self {
        self.provider = Some(v.into());
        self
    }
    pub fn identity(mut self, v: impl Into<String>) -> Self {
        self.identity = Some(v.into());
        self
    }
    pub fn object(mut self, v: impl Into<String>) -> Self {
        self.object = Some(v.into());
        self
    }
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = Some(v.into());
        self
    }
    pub fn file(mut self, v: impl Into<String>) -> Self {
        self.file = Some(v.into());
        self
    }
    pub fn outcome(mut self, o: Outcome) -> Self {
        self.outcome = o;
        self
    }
    pub fn error(mut self, e: impl ToString) -> Self {
        self.error = Some(e.to_string());
        self.outcome = if self.outcome == Outcome::Success {
            Outcome::Failure
        } else {
            self.outcome
        };
        self
    }
    pub fn pod(mut self, p: PodRef) -> Self {
        self.pod = Some(p);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
    pub fn process(mut self, p: ProcessRef) -> Self {
        self.process = Some(p);
        self
    }
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency_ms = Some((d.as_secs_f64() * 1e6).round() / 1e3);
        self
    }
}

enum Msg {
    Event(SystemTime, Box<Event>),
    Flush(mpsc::Sender<()>),
}

/// The record as written: the event plus chain fields.
#[derive(Serialize)]
struct Record<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    event: &'a Event,
    prev: &'a str,
}

/// A handle to the audit log. Cloning is cheap; the writer thread ends when the last handle is
/// dropped (after writing everything queued).
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    healthy: Arc<AtomicBool>,
    fail_closed: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .field("fail_closed", &self.fail_closed)
            .finish()
    }
}

impl AuditLog {
    /// Opens (or continues) the log at `path`. The chain continues from the last record found.
    pub fn open(path: &Path, fail_closed: bool) -> Result<Self, AuditError> {
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
        let (seq, prev) = tail_state(&mut file).map_err(err)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            out: BufWriter::new(file),
            head_path: Some(head_path(path)),
            seq,
            prev,
            healthy: healthy.clone(),
            last_head: Instant::now(),
            head_dirty: false,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok(Self {
            tx,
            healthy,
            fail_closed,
        })
    }

    /// Records an event. Blocks when the queue is full: audit records are never dropped.
    pub fn record(&self, event: Event) {
        if self
            .tx
            .send(Msg::Event(SystemTime::now(), Box::new(event)))
            .is_err()
        {
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// Waits until everything queued so far is written and flushed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// False once a write failed.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether new secrets may be served: always, unless fail-closed is on and the log broke.
    pub fn may_serve(&self) -> bool {
        !self.fail_closed || self.healthy()
    }
}

pub fn head_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

/// Finds the sequence number and hash to continue from: those of the file's last line.
fn tail_state(file: &mut File) -> std::io::Result<(u64, String)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    let window = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - window))?;
    let mut buf = Vec::with_capacity(window as usize);
    file.read_to_end(&mut buf)?;
    let trimmed = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let last = trimmed.rsplit(|b| *b == b'\n').next().unwrap_or(trimmed);
    let seq = serde_json::from_slice::<serde_json::Value>(last)
        .ok()
        .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
        .map(|s| s + 1)
        .unwrap_or_else(|| {
            tracing::error!(
                "the audit log's last line is not a record; the chain will break there"
            );
            0
        });
    if !buf.ends_with(b"\n") {
        // A torn last line (crash mid-write): end it so the next record starts on its own line.
        file.write_all(b"\n")?;
    }
    Ok((seq, hex::encode(Sha256::digest(last))))
}

struct Writer {
    out: BufWriter<File>,
    head_path: Option<PathBuf>,
    seq: u64,
    prev: String,
    healthy: Arc<AtomicBool>,
    last_head: Instant,
    head_dirty: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            let mut waiters = Vec::new();
            self.handle(msg, &mut waiters);
            // Drain what is already queued before paying for a flush.
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg, &mut waiters);
            }
            self.flush(!waiters.is_empty());
            for w in waiters {
                let _ = w.send(());
            }
        }
        self.flush(true);
    }

    fn handle(&mut self, msg: Msg, waiters: &mut Vec<mpsc::Sender<()>>) {
        match msg {
            Msg::Event(t, e) => self.write(t, &e),
            Msg::Flush(w) => waiters.push(w),
        }
    }

    fn write(&mut self, time: SystemTime, event: &Event) {
        let rec = Record {
            seq: self.seq,
            time: humantime::format_rfc3339_micros(time).to_string(),
            event,
            prev: &self.prev,
        };
        let line = match serde_json::to_vec(&rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit record");
                self.healthy.store(false, Ordering::Relaxed);
                return;
            }
        };
        let res = self
            .out
            .write_all(&line)
            .and_then(|_| self.out.write_all(b"\n"));
        if let Err(e) = res {
            tracing::error!(error = %e, "cannot write the audit log");
            self.healthy.store(false, Ordering::Relaxed);
            return;
        }
        self.prev = hex::encode(Sha256::digest(&line));
        self.seq += 1;
        self.head_dirty = true;
    }

    fn flush(&mut self, force_head: bool) {
        if let Err(e) = self.out.flush() {
            tracing::error!(error = %e, "cannot flush the audit log");
            self.healthy.store(false, Ordering::Relaxed);
            return;
        }
        if self.head_dirty && (force_head || self.last_head.elapsed() >= HEAD_EVERY) {
            self.write_head();
        }
    }

    fn write_head(&mut self) {
        let Some(path) = &self.head_path else { return };
        if self.seq == 0 {
            return;
        }
        let head = serde_json::json!({ "seq": self.seq - 1, "hash": self.prev });
        let tmp = path.with_extension("head.tmp");
        let res = std::fs::write(&tmp, head.to_string()).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            tracing::error!(error = %e, "cannot write the audit head anchor");
            self.healthy.store(false, Ordering::Relaxed);
        }
        self.last_head = Instant::now();
        self.head_dirty = false;
    }
}

/// What `audit verify` found in an intact log.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub anchored: bool,
}

/// Where and why a chain broke. `line` is 1-based.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ChainBreak {
    pub line: u64,
    pub reason: String,
}

/// Checks the chain of the log at `path` (and its head anchor, when present).
pub fn verify(path: &Path) -> Result<Result<VerifyReport, ChainBreak>, AuditError> {
    let file = File::open(path).map_err(|e| AuditError::Open {
        path: path.to_owned(),
        error: e.to_string(),
    })?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS.to_owned();
    let mut expect_seq = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    let brk = |line: u64, reason: String| Ok(Err(ChainBreak { line, reason }));
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| AuditError::Open {
                path: path.to_owned(),
                error: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if !buf.ends_with(b"\n") {
            return brk(
                line_no,
                "the line is cut off (no end of line): the log was truncated".into(),
            );
        }
        let line = &buf[..buf.len() - 1];
        let v: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(_) => return brk(line_no, "not a JSON record".into()),
        };
        let seq = v.get("seq").and_then(|s| s.as_u64());
        let rec_prev = v.get("prev").and_then(|s| s.as_str());
        if seq != Some(expect_seq) {
            let reason = match seq {
                Some(s) if s > expect_seq => format!(
                    "sequence jumps from {} to {s}: records were deleted",
                    expect_seq as i64 - 1
                ),
                Some(s) => format!(
                    "sequence goes back to {s} (expected {expect_seq}): records were reordered or duplicated"
                ),
                None => "the record has no sequence number".into(),
            };
            return brk(line_no, reason);
        }
        if rec_prev != Some(prev.as_str()) {
            return brk(
                line_no,
                "the hash of the previous record does not match: the previous line was edited, or records were reordered".into(),
            );
        }
        prev = hex::encode(Sha256::digest(line));
        expect_seq += 1;
    }
    let mut anchored = false;
    if let Ok(head) = std::fs::read_to_string(head_path(path)) {
        let head: serde_json::Value = serde_json::from_str(&head).unwrap_or_default();
        let (Some(hseq), Some(hhash)) = (
            head.get("seq").and_then(|s| s.as_u64()),
            head.get("hash").and_then(|h| h.as_str()),
        ) else {
            return brk(line_no + 1, "the head anchor is unreadable".into());
        };
        if expect_seq <= hseq {
            return brk(
                line_no + 1,
                format!(
                    "the log ends at record {} but the head anchor records {hseq}: records were cut off the end",
                    expect_seq as i64 - 1
                ),
            );
        }
        if expect_seq == hseq + 1 && hhash != prev {
            return brk(
                line_no,
                "the last record does not match the head anchor: it was edited".into(),
            );
        }
        anchored = true;
    }
    Ok(Ok(VerifyReport {
        records: expect_seq,
        anchored,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {error}")]
    Open { path: PathBuf, error: String },
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
            verify(&path).unwrap(),
            Ok(VerifyReport {
                records: 3,
                anchored: true
            })
        );
        let log = AuditLog::open(&path, false).unwrap();
        log.record(Event::new(EventKind::Unmount));
        log.flush();
        assert_eq!(
            verify(&path).unwrap(),
            Ok(VerifyReport {
                records: 4,
                anchored: true
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
        assert_eq!(verify(&path).unwrap().unwrap_err().line, 3);

        let mut deleted = orig.clone();
        deleted.remove(2);
        put(&path, &deleted);
        let e = verify(&path).unwrap().unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("deleted"), "{e}");

        let mut reordered = orig.clone();
        reordered.swap(1, 2);
        put(&path, &reordered);
        assert_eq!(verify(&path).unwrap().unwrap_err().line, 2);

        put(&path, &orig[..3]);
        let e = verify(&path).unwrap().unwrap_err();
        assert!(e.reason.contains("cut off the end"), "{e}");

        let mut torn = orig.join("\n");
        torn.truncate(torn.len() - 5);
        std::fs::write(&path, torn).unwrap();
        let e = verify(&path).unwrap().unwrap_err();
        assert_eq!(e.line, 5);

        let mut last_edited = orig.clone();
        last_edited[4] = last_edited[4].replace("obj4", "objY");
        put(&path, &last_edited);
        let e = verify(&path).unwrap().unwrap_err();
        assert!(e.reason.contains("head anchor"), "{e}");

        put(&path, &orig);
        assert!(verify(&path).unwrap().is_ok());
    }
}
