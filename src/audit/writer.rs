//! The writer thread: stamps, links and writes records; survives write failures.

use super::*;

pub(super) enum Msg {
    Event(SystemTime, Box<Event>),
    Flush(mpsc::Sender<()>),
    /// Write everything queued, then nothing more (a newer process writes the log now).
    Seal(mpsc::Sender<()>),
}

/// How long the writer waits before trying a failed write again.
pub(super) const RETRY: Duration = Duration::from_millis(500);
/// Records kept in memory while the log cannot be written; past this they are dropped and a
/// gap record says how many, once the log is writable again.
pub(super) const MAX_PENDING: usize = 8 << 20;

pub(super) struct Writer {
    pub(super) file: File,
    /// Where the head anchor goes (`None` for a stream such as stdout).
    pub(super) head_path: Option<PathBuf>,
    pub(super) key: Option<AuditKey>,
    /// Serialized records not yet on disk (chained, in order).
    pub(super) pending: Vec<u8>,
    pub(super) pending_records: u64,
    /// The file's length after the last complete successful write: a failed write is cut
    /// back to it, so a half-written line never stays in the log.
    pub(super) good_len: u64,
    /// Sequence number and link after the last record on disk.
    pub(super) good_seq: u64,
    pub(super) good_prev: String,
    /// Sequence number and link after the last record serialized (on disk or pending).
    pub(super) seq: u64,
    pub(super) prev: String,
    pub(super) health: Arc<Health>,
    pub(super) last_head: Instant,
    pub(super) head_dirty: bool,
    pub(super) failing_since: Option<SystemTime>,
    pub(super) last_complaint: Option<Instant>,
    /// Handed to a newer process: nothing more is written.
    pub(super) sealed: bool,
}

impl Writer {
    /// A writer continuing a chain at `seq` after `prev`, the file's whole records ending at
    /// byte `len`.
    pub(super) fn new(
        file: File,
        head_path: Option<PathBuf>,
        key: Option<AuditKey>,
        len: u64,
        seq: u64,
        prev: String,
        health: Arc<Health>,
    ) -> Self {
        Writer {
            file,
            head_path,
            key,
            pending: Vec::new(),
            pending_records: 0,
            good_len: len,
            good_seq: seq,
            good_prev: prev.clone(),
            seq,
            prev,
            health,
            last_head: Instant::now(),
            head_dirty: seq > 0,
            failing_since: None,
            last_complaint: None,
            sealed: false,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
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
            Msg::Event(t, e) if self.sealed => {
                tracing::error!(event = ?e.event, time = %humantime::format_rfc3339_micros(t), "audit record after the log was handed to a newer process; not written (that process writes the log now)");
            }
            Msg::Event(t, e) => self.write(t, &e),
            Msg::Flush(w) => waiters.push(w),
            Msg::Seal(w) => {
                self.flush(true);
                if self.pending_records > 0 {
                    tracing::error!(
                        records = self.pending_records,
                        "audit records not written before the log was handed to a newer process (the log could not be written)"
                    );
                    self.pending.clear();
                    self.pending_records = 0;
                }
                self.sealed = true;
                let _ = w.send(());
            }
        }
    }

    /// Serializes a record into the pending buffer, chained to the one before.
    pub(super) fn write(&mut self, time: SystemTime, event: &Event) {
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
