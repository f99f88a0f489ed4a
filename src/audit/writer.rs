//! The writer thread: stamps, links and writes records; survives write failures.

use super::*;

pub(super) enum Msg {
    Event(SystemTime, Box<Event>),
    Flush(mpsc::Sender<()>),
    /// Sign what was written (a checkpoint, with a signing key), then flush.
    Checkpoint(mpsc::Sender<()>),
    /// Write and sign everything queued, anchor the head, then nothing more.
    Close(Closing, mpsc::Sender<()>),
}

/// Why the writer stops writing for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Closing {
    /// A newer process writes the log now (a handover).
    HandedOver,
    /// The process is stopping (a clean shutdown).
    Stopped,
}

/// How long the writer waits before trying a failed write again.
pub(super) const RETRY: Duration = Duration::from_millis(500);
/// Records kept in memory while the log cannot be written; past this they are dropped and a
/// gap record says how many, once the log is writable again.
pub(super) const MAX_PENDING: usize = 8 << 20;
/// Bytes of records written at once at most while records keep coming.
const WRITE_BATCH: usize = 1 << 20;

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
    pub(super) closed: Option<Closing>,
    /// The active segment of a rotating log (`None`: one file, never sealed).
    pub(super) active: Option<segments::Active>,
    /// A segment whose `seal` record is written and whose rename (and the new active file)
    /// is still to do: nothing is written until it is done.
    pub(super) seal_pending: Option<PathBuf>,
    /// Signs checkpoints and the head anchor.
    pub(super) signer: Option<Arc<signing::SigningKey>>,
    pub(super) last_checkpoint: Instant,
    /// Records written since the last checkpoint.
    pub(super) unsigned: u64,
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
            closed: None,
            active: None,
            seal_pending: None,
            signer: None,
            last_checkpoint: Instant::now(),
            unsigned: 0,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let wait = if !self.pending.is_empty() {
                Some(RETRY)
            } else if self.signer.is_some() && self.unsigned > 0 {
                // Records wait at most CHECKPOINT_EVERY for their signature.
                Some(
                    CHECKPOINT_EVERY
                        .saturating_sub(self.last_checkpoint.elapsed())
                        .max(Duration::from_millis(10)),
                )
            } else {
                None
            };
            let first = match wait {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(t) => rx.recv_timeout(t),
            };
            let mut waiters = Vec::new();
            match first {
                Ok(msg) => self.handle(msg, &mut waiters),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // Drain what is already queued before paying for a write, up to a batch: producers
            // as fast as this thread would otherwise keep it draining, and the pending buffer
            // would pass the bound meant for an unwritable log (and drop records).
            while self.pending.len() < WRITE_BATCH
                && let Ok(msg) = rx.try_recv()
            {
                self.handle(msg, &mut waiters);
            }
            self.flush(!waiters.is_empty());
            for w in waiters {
                let _ = w.send(());
            }
        }
        self.flush(true);
        self.checkpoint();
        self.flush(true);
    }

    fn handle(&mut self, msg: Msg, waiters: &mut Vec<mpsc::Sender<()>>) {
        match msg {
            Msg::Event(t, e) if self.closed == Some(Closing::HandedOver) => {
                tracing::error!(event = ?e.event, time = %humantime::format_rfc3339_micros(t), "audit record after the log was handed to a newer process; not written (that process writes the log now)");
            }
            Msg::Event(t, e) if self.closed.is_some() => {
                tracing::error!(event = ?e.event, time = %humantime::format_rfc3339_micros(t), "audit record after the log was closed at shutdown; not written");
            }
            Msg::Event(t, e) => self.write(t, &e),
            Msg::Flush(w) => waiters.push(w),
            Msg::Checkpoint(w) => {
                self.flush(true);
                self.checkpoint();
                waiters.push(w);
            }
            Msg::Close(why, w) => {
                // A seal due now happens first, so that nothing follows the checkpoint: the
                // last record is signed and the head names it when the process exits.
                self.flush(true);
                self.checkpoint();
                if self.write_pending() && self.head_dirty {
                    self.write_head();
                }
                if self.pending_records > 0 {
                    tracing::error!(
                        records = self.pending_records,
                        "audit records not written before the log was closed (the log could not be written)"
                    );
                    self.pending.clear();
                    self.pending_records = 0;
                }
                self.closed = Some(why);
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
            schema: chain::SCHEMA,
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
        if event.event != Some(EventKind::Checkpoint) {
            self.unsigned += 1;
        }
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
        if let Some(target) = self.seal_pending.clone()
            && !self.finish_seal(&target)
        {
            return;
        }
        if !self.write_pending() {
            return;
        }
        if self.unsigned > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint();
        }
        self.maybe_seal();
        if self.head_dirty && (force_head || self.last_head.elapsed() >= HEAD_EVERY) {
            self.write_head();
        }
    }

    /// Writes the pending records; false (and they stay pending) if the write failed.
    pub(super) fn write_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
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
                true
            }
            Err(e) => {
                // Cut a partial line back off, so the log stays a chain of whole records.
                let _ = self.file.set_len(self.good_len);
                self.failed(&e);
                false
            }
        }
    }

    /// Seals the active segment when it is due (size or age): its `seal` record, synced,
    /// then the rename and a new active file ([`Self::finish_seal`]).
    fn maybe_seal(&mut self) {
        let Some(a) = &self.active else { return };
        if self.closed.is_some() || !a.due(self.good_len) {
            return;
        }
        // Every record of the segment but its seal is signed inside it.
        if !self.checkpoint() {
            return;
        }
        let Some(a) = &self.active else { return };
        let target = segments::sealed_path(&a.log, a.first_seq);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let detail = format!(
            "segment sealed: records {} to {}; the chain goes on in {}",
            a.first_seq,
            self.seq,
            a.log
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let before = (self.seq, self.prev.clone());
        let mut seal = Event::new(EventKind::Seal).detail(detail);
        seal.segment = Some(name);
        self.write(SystemTime::now(), &seal);
        if !self.write_pending() {
            // Not sealed after all (the write failed): the record is taken back, and the
            // segment is sealed after a later write succeeds.
            self.pending.clear();
            self.pending_records = 0;
            (self.seq, self.prev) = before;
            return;
        }
        if let Err(e) = self.file.sync_data() {
            tracing::warn!(error = %e, "cannot sync the sealed audit segment");
        }
        self.seal_pending = Some(target.clone());
        self.finish_seal(&target);
    }

    /// The rest of a seal: the rename, a new active file, then retention. False while it
    /// cannot be done (nothing is written meanwhile: the records wait in memory).
    fn finish_seal(&mut self, target: &Path) -> bool {
        let Some(log) = self.active.as_ref().map(|a| a.log.clone()) else {
            self.seal_pending = None;
            return true;
        };
        if !target.exists()
            && let Err(e) = std::fs::rename(&log, target)
        {
            self.failed(&e);
            return false;
        }
        segments::sync_dir(&log);
        match OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log)
        {
            Ok(f) => self.file = f,
            Err(e) => {
                self.failed(&e);
                return false;
            }
        }
        self.good_len = 0;
        if let Some(a) = &mut self.active {
            a.first_seq = self.seq;
            a.started = SystemTime::now();
        }
        self.seal_pending = None;
        self.prune();
        true
    }

    /// A signed checkpoint over the last record written, when records came since the last
    /// one (with a signing key); false if it could not be written.
    fn checkpoint(&mut self) -> bool {
        let Some(signer) = self.signer.clone() else {
            return true;
        };
        if self.unsigned == 0 || self.seq == 0 || self.closed.is_some() {
            return true;
        }
        let now = SystemTime::now();
        let time = humantime::format_rfc3339_micros(now).to_string();
        let (seq, link) = (self.seq - 1, self.prev.clone());
        let segment = self.active.as_ref().map_or(0, |a| a.first_seq);
        let signature = signer.sign(&signing::checkpoint_message(seq, &link, segment, &time));
        let mut e = Event::new(EventKind::Checkpoint);
        e.checkpoint = Some(event::Checkpoint {
            seq,
            link,
            segment,
            key_id: signer.id().to_owned(),
            signature,
        });
        self.write(now, &e);
        self.unsigned = 0;
        self.last_checkpoint = Instant::now();
        self.write_pending()
    }

    /// Retention: the oldest sealed segments over `--audit-retain` are named in a synced
    /// `prune` record, then deleted.
    pub(super) fn prune(&mut self) {
        let Some(a) = &self.active else { return };
        let doomed = a.doomed(self.good_len);
        let Some(last) = doomed.last() else { return };
        let (through_seq, link_of_last) = match segments::first_and_last_line(&last.path) {
            Ok((_, line)) => match segments::line_info(&line) {
                Some(info) => (info.seq, link(self.key.as_ref(), &line)),
                None => {
                    tracing::error!(segment = %last.path.display(), "retention: the segment's last line is not a record; it is kept");
                    return;
                }
            },
            Err(e) => {
                tracing::error!(segment = %last.path.display(), error = %e, "retention: cannot read the segment; it is kept");
                return;
            }
        };
        let names: Vec<String> = doomed
            .iter()
            .filter_map(|s| s.path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut rec = Event::new(EventKind::Prune).detail(format!(
            "retention deleted the {} oldest segments (records up to {through_seq})",
            names.len()
        ));
        rec.pruned = Some(event::Pruned {
            through_seq,
            link: link_of_last,
            segments: names,
        });
        self.write(SystemTime::now(), &rec);
        // Deleted only once the record that names them is on disk.
        if !self.write_pending() {
            return;
        }
        let _ = self.file.sync_data();
        for s in &doomed {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::error!(segment = %s.path.display(), error = %e, "retention: cannot delete the segment");
            }
        }
        if let Some(a) = &self.active {
            segments::sync_dir(&a.log);
        }
        tracing::info!(
            segments = doomed.len(),
            through_seq,
            "audit retention deleted the oldest segments"
        );
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
        if let Some(s) = &self.signer {
            head["key_id"] = s.id().into();
            head["sig"] = s.sign(&signing::head_message(seq, &self.good_prev)).into();
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
