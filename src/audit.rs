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

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Records queued for the writer thread before `record` blocks. std's bounded channel
/// allocates and initializes every slot up front (32 bytes each): 65,536 slots were 2 MiB
/// resident in every process; the writer drains thousands of records per millisecond, so a
/// burst larger than this only waits, it never loses a record.
const QUEUE: usize = 4096;
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
    /// A span in which events may be missing (a kernel queue overflowed, a restart).
    Gap,
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
    /// A short, stable reason code for a denial (a provider's refusal code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
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

/// The key of a keyed chain (HMAC-SHA256). With a key, `prev` is the HMAC of the previous line
/// and the head anchor carries a MAC, so forging, truncating or re-chaining the log needs the
/// key; without one, `prev` is a plain SHA-256 that anyone can recompute.
#[derive(Clone)]
pub struct AuditKey(zeroize::Zeroizing<Vec<u8>>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// Reads a key file: 64 hex digits, or at least 32 raw bytes.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let bad = |error: String| AuditError::Key {
            path: path.to_owned(),
            error,
        };
        let raw = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        let trimmed = raw.trim_ascii();
        if trimmed.len() == 64 && trimmed.iter().all(u8::is_ascii_hexdigit) {
            let key = hex::decode(trimmed).map_err(|e| bad(e.to_string()))?;
            return Ok(Self(zeroize::Zeroizing::new(key)));
        }
        if raw.len() < 32 {
            return Err(bad(
                "the key must be 64 hex digits or at least 32 bytes (e.g. `head -c 32 /dev/urandom`)"
                    .into(),
            ));
        }
        Ok(Self(raw))
    }

    pub fn from_bytes(b: &[u8]) -> Self {
        Self(zeroize::Zeroizing::new(b.to_vec()))
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        use hmac::Mac;
        // HMAC takes keys of any length.
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        for p in parts {
            m.update(p);
        }
        hex::encode(m.finalize().into_bytes())
    }
}

/// How one record is linked to the line before it.
fn link(key: Option<&AuditKey>, line: &[u8]) -> String {
    match key {
        Some(k) => k.mac(&[line]),
        None => hex::encode(Sha256::digest(line)),
    }
}

fn head_mac(key: &AuditKey, seq: u64, hash: &str) -> String {
    key.mac(&[
        b"keybroker-audit-head\0",
        seq.to_string().as_bytes(),
        b"\0",
        hash.as_bytes(),
    ])
}

fn alg(key: Option<&AuditKey>) -> &'static str {
    if key.is_some() {
        "hmac-sha256"
    } else {
        "sha256"
    }
}

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
        let mut writer = Writer {
            file,
            head_path: Some(head_path(path)),
            key,
            pending: Vec::new(),
            pending_records: 0,
            good_len,
            good_seq: tail.seq,
            good_prev: tail.prev.clone(),
            seq: tail.seq,
            prev: tail.prev,
            health: health.clone(),
            last_head: Instant::now(),
            head_dirty: tail.seq > 0,
            failing_since: None,
            last_complaint: None,
        };
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
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
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
        let writer = Writer {
            file: File::from(fd),
            head_path: None,
            key: None,
            pending: Vec::new(),
            pending_records: 0,
            good_len: 0,
            good_seq: 0,
            good_prev: GENESIS.to_owned(),
            seq: 0,
            prev: GENESIS.to_owned(),
            health: health.clone(),
            last_head: Instant::now(),
            head_dirty: false,
            failing_since: None,
            last_complaint: None,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok(Self {
            tx,
            health,
            fail_closed,
            previous_last: None,
        })
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

/// Where an existing log's chain continues.
struct Tail {
    seq: u64,
    prev: String,
    /// Bytes after the last complete record, cut off.
    torn: Option<Torn>,
    /// The last record links to the one before it the way this writer links (same key, or
    /// none on both sides). True when there is nothing to compare.
    chain_matches: bool,
    /// `time` of the last complete record (where a previous process stopped writing).
    last_time: Option<String>,
}

struct Torn {
    bytes: u64,
    sha256: String,
}

/// Finds the sequence number and link to continue from: those of the last complete record.
/// Anything after it (a torn write, garbage) is cut off the file and reported.
fn tail_state(file: &mut File, key: Option<&AuditKey>) -> std::io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    let fresh = Tail {
        seq: 0,
        prev: GENESIS.to_owned(),
        torn: None,
        chain_matches: true,
        last_time: None,
    };
    if len == 0 {
        return Ok(fresh);
    }
    let window = len.min(1 << 20);
    let start = len - window;
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(window as usize);
    file.read_to_end(&mut buf)?;
    // Complete lines that are records, from the end.
    let mut end = buf.len();
    if !buf.ends_with(b"\n") {
        end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    }
    let mut good: Option<(usize, usize, u64)> = None; // (line start, line end, seq)
    let mut cursor = end;
    while cursor > 0 {
        let line_end = cursor - 1; // the '\n'
        let line_start = buf[..line_end]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let line = &buf[line_start..line_end];
        if let Some(seq) = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
        {
            good = Some((line_start, line_end, seq));
            break;
        }
        cursor = line_start;
        if line_start == 0 {
            break;
        }
    }
    let Some((ls, le, seq)) = good else {
        if start > 0 {
            // No record in the last MiB: leave the file alone and start a new chain after it;
            // `verify` will show where.
            tracing::error!("no audit record found in the log's last MiB; continuing after it");
            return Ok(fresh);
        }
        return cut(file, len, 0, buf, fresh);
    };
    let last = &buf[ls..le];
    // The line before the last one, to see how the log links records.
    let linked_as_we_link = |before: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(last)
            .ok()
            .and_then(|v| v.get("prev").and_then(|p| p.as_str()).map(str::to_owned))
            .is_none_or(|want| want == link(key, before))
    };
    let chain_matches = if ls == 0 {
        true
    } else {
        let pe = ls - 1;
        match buf[..pe].iter().rposition(|b| *b == b'\n') {
            Some(i) => linked_as_we_link(&buf[i + 1..pe]),
            None if start == 0 => linked_as_we_link(&buf[..pe]),
            None => true,
        }
    };
    let tail = Tail {
        seq: seq + 1,
        prev: link(key, last),
        torn: None,
        chain_matches,
        last_time: serde_json::from_slice::<serde_json::Value>(last)
            .ok()
            .and_then(|v| v.get("time").and_then(|t| t.as_str()).map(str::to_owned)),
    };
    let keep = start + le as u64 + 1;
    if keep < len {
        return cut(file, len, keep, buf[le + 1..].to_vec(), tail);
    }
    Ok(tail)
}

fn cut(
    file: &mut File,
    len: u64,
    keep: u64,
    removed: Vec<u8>,
    mut tail: Tail,
) -> std::io::Result<Tail> {
    file.set_len(keep)?;
    tail.torn = Some(Torn {
        bytes: len - keep,
        sha256: hex::encode(Sha256::digest(&removed)),
    });
    Ok(tail)
}

/// How long the writer waits before trying a failed write again.
const RETRY: Duration = Duration::from_millis(500);
/// Records kept in memory while the log cannot be written; past this they are dropped and a
/// gap record says how many, once the log is writable again.
const MAX_PENDING: usize = 8 << 20;

struct Writer {
    file: File,
    /// Where the head anchor goes (`None` for a stream such as stdout).
    head_path: Option<PathBuf>,
    key: Option<AuditKey>,
    /// Serialized records not yet on disk (chained, in order).
    pending: Vec<u8>,
    pending_records: u64,
    /// The file's length after the last complete successful write: a failed write is cut
    /// back to it, so a half-written line never stays in the log.
    good_len: u64,
    /// Sequence number and link after the last record on disk.
    good_seq: u64,
    good_prev: String,
    /// Sequence number and link after the last record serialized (on disk or pending).
    seq: u64,
    prev: String,
    health: Arc<Health>,
    last_head: Instant,
    head_dirty: bool,
    failing_since: Option<SystemTime>,
    last_complaint: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = if self.pending.is_empty() {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(RETRY)
            };
            let mut waiters = Vec::new();
            match first {
                Ok(msg) => self.handle(msg, &mut waiters),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // Drain what is already queued before paying for a write.
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

    /// Serializes a record into the pending buffer, chained to the one before.
    fn write(&mut self, time: SystemTime, event: &Event) {
        if self.pending.len() > MAX_PENDING {
            self.drop_pending();
        }
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
                return;
            }
        };
        self.prev = link(self.key.as_ref(), &line);
        self.seq += 1;
        self.pending.extend_from_slice(&line);
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Memory is bounded while the log is unwritable: the records not written are dropped,
    /// the chain goes on from the last record on disk, and a gap record says what was lost.
    fn drop_pending(&mut self) {
        let (first, last) = (self.good_seq, self.seq.saturating_sub(1));
        let n = self.pending_records;
        self.pending.clear();
        self.pending_records = 0;
        self.seq = self.good_seq;
        self.prev = self.good_prev.clone();
        let since = self
            .failing_since
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        tracing::error!(
            dropped = n,
            "the audit log has been unwritable too long; dropping queued records (a gap record says so)"
        );
        self.write(
            SystemTime::now(),
            &Event::new(EventKind::Error)
                .outcome(Outcome::Failure)
                .detail(format!(
                    "audit gap: {n} records (numbered {first} to {last} when queued) could not be written and were dropped; the log was unwritable since {since}"
                )),
        );
    }

    fn flush(&mut self, force_head: bool) {
        if !self.pending.is_empty() {
            match self.file.write_all(&self.pending) {
                Ok(()) => {
                    self.good_len += self.pending.len() as u64;
                    self.good_seq = self.seq;
                    self.good_prev = self.prev.clone();
                    self.pending.clear();
                    self.pending_records = 0;
                    self.head_dirty = true;
                    if self.health.broken.swap(false, Ordering::Relaxed) {
                        self.failing_since = None;
                        tracing::warn!("the audit log is writable again");
                    }
                }
                Err(e) => {
                    // Cut a partial line back off, so the log stays a chain of whole records.
                    let _ = self.file.set_len(self.good_len);
                    self.failed(&e);
                    return;
                }
            }
        }
        if self.head_dirty && (force_head || self.last_head.elapsed() >= HEAD_EVERY) {
            self.write_head();
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        self.health.write_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .health
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        if !self.health.broken.swap(true, Ordering::Relaxed) {
            self.failing_since = Some(SystemTime::now());
        }
        // Retries happen every RETRY; say so once a minute, not each time.
        if self
            .last_complaint
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.last_complaint = Some(Instant::now());
            tracing::error!(error = %e, queued = self.pending_records, "cannot write the audit log; retrying");
        }
    }

    fn write_head(&mut self) {
        let Some(head_path) = self.head_path.clone() else {
            return;
        };
        if self.good_seq == 0 {
            return;
        }
        let seq = self.good_seq - 1;
        let mut head = serde_json::json!({
            "seq": seq,
            "hash": self.good_prev,
            "alg": alg(self.key.as_ref()),
        });
        if let Some(k) = &self.key {
            head["mac"] = head_mac(k, seq, &self.good_prev).into();
        }
        let tmp = head_path.with_extension("head.tmp");
        let res =
            std::fs::write(&tmp, head.to_string()).and_then(|_| std::fs::rename(&tmp, &head_path));
        self.last_head = Instant::now();
        match res {
            Ok(()) => self.head_dirty = false,
            Err(e) => {
                self.health.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot write the audit head anchor; will retry");
            }
        }
    }
}

/// What `audit verify` found in an intact log.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub anchored: bool,
    /// Records after the head anchor (written after its last update). Only accepted in a keyed
    /// log, where they carry MACs.
    pub beyond_head: u64,
}

/// Where and why a chain broke. `line` is 1-based.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ChainBreak {
    pub line: u64,
    pub reason: String,
}

/// How to verify.
#[derive(Debug, Default)]
pub struct VerifyOptions {
    /// The chain key; required for a keyed log.
    pub key: Option<AuditKey>,
    /// Accept a log without its `.head` anchor (records cut off the end are then undetectable).
    pub allow_missing_head: bool,
}

/// Checks the chain of the log at `path` and its head anchor.
pub fn verify(
    path: &Path,
    opts: &VerifyOptions,
) -> Result<Result<VerifyReport, ChainBreak>, AuditError> {
    let file = File::open(path).map_err(|e| AuditError::Open {
        path: path.to_owned(),
        error: e.to_string(),
    })?;
    let head = match std::fs::read_to_string(head_path(path)) {
        Ok(h) => Some(h),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(AuditError::Open {
                path: head_path(path),
                error: e.to_string(),
            });
        }
    };
    verify_reader(BufReader::new(file), head.as_deref(), opts).map_err(|e| AuditError::Open {
        path: path.to_owned(),
        error: e.to_string(),
    })
}

/// [`verify`] over any reader (the log) and the head anchor's text, if there is one.
pub fn verify_reader(
    mut reader: impl BufRead,
    head: Option<&str>,
    opts: &VerifyOptions,
) -> std::io::Result<Result<VerifyReport, ChainBreak>> {
    let key = opts.key.as_ref();
    let mut prev = GENESIS.to_owned();
    let mut expect_seq = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    let brk = |line: u64, reason: String| Ok(Err(ChainBreak { line, reason }));
    let head: Option<serde_json::Value> = match head {
        None => None,
        Some(h) => match serde_json::from_str(h) {
            Ok(v) => Some(v),
            Err(_) => return brk(1, "the head anchor is unreadable".into()),
        },
    };
    if let Some(h) = &head {
        let head_alg = h.get("alg").and_then(|a| a.as_str()).unwrap_or("sha256");
        if head_alg != alg(key) {
            let reason = if key.is_none() {
                "the log is keyed (hmac-sha256): verify it with --key".to_string()
            } else {
                format!("the log is not keyed ({head_alg}): verify it without --key")
            };
            return brk(1, reason);
        }
    }
    // Lines are bounded so a corrupt log cannot exhaust memory.
    const MAX_LINE: u64 = 1 << 20;
    loop {
        buf.clear();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if !buf.ends_with(b"\n") {
            let reason = if n as u64 == MAX_LINE {
                "the line is longer than 1 MiB: not a record".into()
            } else {
                "the line is cut off (no end of line): the log was truncated".into()
            };
            return brk(line_no, reason);
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
            let reason = match key {
                Some(_) if line_no > 1 => {
                    "the MAC of the previous record does not match: the previous line was edited or forged, records were reordered, or the key is wrong"
                }
                _ => {
                    "the hash of the previous record does not match: the previous line was edited, or records were reordered"
                }
            };
            return brk(line_no, reason.into());
        }
        prev = link(key, line);
        expect_seq += 1;
    }
    let Some(head) = head else {
        if opts.allow_missing_head {
            return Ok(Ok(VerifyReport {
                records: expect_seq,
                anchored: false,
                beyond_head: 0,
            }));
        }
        return brk(
            line_no + 1,
            "the head anchor (<log>.head) is missing: records cut off the end cannot be detected without it (--allow-missing-head accepts that)".into(),
        );
    };
    let (Some(hseq), Some(hhash)) = (
        head.get("seq").and_then(|s| s.as_u64()),
        head.get("hash").and_then(|h| h.as_str()),
    ) else {
        return brk(line_no + 1, "the head anchor is unreadable".into());
    };
    if let Some(k) = key
        && head.get("mac").and_then(|m| m.as_str()) != Some(head_mac(k, hseq, hhash).as_str())
    {
        return brk(
            line_no + 1,
            "the head anchor's MAC does not match: it was forged or the key is wrong".into(),
        );
    }
    if expect_seq <= hseq {
        return brk(
            line_no + 1,
            format!(
                "the log ends at record {} but the head anchor records {hseq}: records were cut off the end",
                expect_seq as i64 - 1
            ),
        );
    }
    // The record the anchor names must be the one in the log.
    let beyond = expect_seq - hseq - 1;
    if beyond == 0 && hhash != prev {
        return brk(
            line_no,
            "the last record does not match the head anchor: it was edited".into(),
        );
    }
    if beyond > 0 && key.is_none() {
        return brk(
            line_no + 1 - beyond,
            format!(
                "{beyond} records follow the record the head anchor names ({hseq}): appended after the anchor, or written just before a crash; without a key they cannot be told apart from forged ones"
            ),
        );
    }
    Ok(Ok(VerifyReport {
        records: expect_seq,
        anchored: true,
        beyond_head: beyond,
    }))
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
