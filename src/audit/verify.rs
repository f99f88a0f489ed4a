//! Offline verification of a log and its head anchor (`keybroker audit verify`).

use super::*;

/// What `audit verify` found in an intact log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub anchored: bool,
    /// Records after the head anchor (written after its last update). Only accepted in a keyed
    /// log, where they carry MACs.
    pub beyond_head: u64,
    /// Files read: the sealed segments, then the active one.
    pub segments: u64,
    /// The log starts after records retention deleted: every record up to this one, as a
    /// `prune` record in the log names them.
    pub pruned_through: Option<u64>,
    /// With public keys: signed checkpoints verified, and the records after the last one
    /// (covered by the signed head anchor when it names the last record).
    pub checkpoints: u64,
    pub after_last_checkpoint: u64,
}

/// Where and why a chain broke: the file (a segment's name; empty for a stream) and the
/// 1-based line in it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}line {line}: {reason}", if file.is_empty() { String::new() } else { format!("{file}: ") })]
pub struct ChainBreak {
    pub file: String,
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
    /// Verify the signed checkpoints and head with these public keys (any of them, by key
    /// id): no secret is needed, and none is enough to forge.
    pub public_keys: Vec<PublicKey>,
}

/// Checks the chain of the log at `path`: its sealed segments in order, then the active file
/// (`path` itself), and the head anchor.
pub fn verify(
    path: &Path,
    opts: &VerifyOptions,
) -> Result<Result<VerifyReport, ChainBreak>, AuditError> {
    let open_err = |p: &Path, e: std::io::Error| AuditError::Open {
        path: p.to_owned(),
        error: e.to_string(),
    };
    let sealed = sealed_segments(path).map_err(|e| open_err(path, e))?;
    let active = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !sealed.is_empty() => None,
        Err(e) => return Err(open_err(path, e)),
    };
    let head = match std::fs::read_to_string(head_path(path)) {
        Ok(h) => Some(h),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(open_err(&head_path(path), e)),
    };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut v = match Verifier::new(head.as_deref(), opts) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    for s in &sealed {
        let f = File::open(&s.path).map_err(|e| open_err(&s.path, e))?;
        match v.feed(&name(&s.path), BufReader::new(f), Some(s.first_seq)) {
            Ok(Ok(())) => {}
            Ok(Err(b)) => return Ok(Err(b)),
            Err(e) => return Err(open_err(&s.path, e)),
        }
    }
    if let Some(f) = active {
        match v.feed(&name(path), BufReader::new(f), None) {
            Ok(Ok(())) => {}
            Ok(Err(b)) => return Ok(Err(b)),
            Err(e) => return Err(open_err(path, e)),
        }
    }
    Ok(v.finish(opts.allow_missing_head))
}

/// [`verify`] over any reader (one file or stream, no segments) and the head anchor's text,
/// if there is one.
pub fn verify_reader(
    reader: impl BufRead,
    head: Option<&str>,
    opts: &VerifyOptions,
) -> std::io::Result<Result<VerifyReport, ChainBreak>> {
    let mut v = match Verifier::new(head, opts) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    if let Err(b) = v.feed("", reader, None)? {
        return Ok(Err(b));
    }
    Ok(v.finish(opts.allow_missing_head))
}

/// The chain across the files of one log, fed in order.
pub(super) struct Verifier {
    key: Option<AuditKey>,
    head: Option<serde_json::Value>,
    prev: String,
    expect_seq: u64,
    /// Lines fed so far (records), and the last file's name and line count.
    records: u64,
    file: String,
    line_no: u64,
    files: u64,
    /// The log's first record when it is not record 0: (seq, its prev, file).
    start: Option<(u64, String, String)>,
    /// Every `prune` record's claim.
    pruned: Vec<Pruned>,
    public_keys: Vec<PublicKey>,
    checkpoints: u64,
    /// Records counted when the last checkpoint was read.
    signed_records: u64,
    /// Fed from a segment in the middle of the log (a query from a time on): the first
    /// record's link is taken as it is.
    pub(super) from_middle: bool,
}

impl Verifier {
    pub(super) fn new(head: Option<&str>, opts: &VerifyOptions) -> Result<Self, ChainBreak> {
        let brk = |reason: &str| ChainBreak {
            file: String::new(),
            line: 1,
            reason: reason.into(),
        };
        let head: Option<serde_json::Value> = match head {
            None => None,
            Some(h) => {
                Some(serde_json::from_str(h).map_err(|_| brk("the head anchor is unreadable"))?)
            }
        };
        let key = opts.key.clone();
        if !opts.public_keys.is_empty() && key.is_some() {
            return Err(brk(
                "--public-key verifies a log with signed checkpoints; --key verifies a keyed (HMAC) one: give one of them",
            ));
        }
        if let Some(h) = &head {
            let head_alg = h.get("alg").and_then(|a| a.as_str()).unwrap_or("sha256");
            if head_alg != alg(key.as_ref()) {
                return Err(brk(&if key.is_none() {
                    "the log is keyed (hmac-sha256): verify it with --key".to_string()
                } else {
                    format!("the log is not keyed ({head_alg}): verify it without --key")
                }));
            }
        }
        Ok(Self {
            key,
            head,
            prev: GENESIS.to_owned(),
            expect_seq: 0,
            records: 0,
            file: String::new(),
            line_no: 0,
            files: 0,
            start: None,
            pruned: Vec::new(),
            public_keys: opts.public_keys.clone(),
            checkpoints: 0,
            signed_records: 0,
            from_middle: false,
        })
    }

    /// A `checkpoint` record `v`: it signs the record before it, in this file's segment.
    fn check_checkpoint(&mut self, v: &serde_json::Value, segment: u64) -> Result<(), String> {
        let Some(cp) = v
            .get("checkpoint")
            .and_then(|c| serde_json::from_value::<Checkpoint>(c.clone()).ok())
        else {
            return Err("a checkpoint record without its checkpoint".into());
        };
        if cp.seq + 1 != self.expect_seq || cp.link != self.prev {
            return Err(format!(
                "the checkpoint signs record {} with another link than the record before it has: it was moved or forged",
                cp.seq
            ));
        }
        if cp.segment != segment {
            return Err(format!(
                "the checkpoint names segment {} but is in the segment starting at {segment}: segments were renamed or records moved",
                cp.segment
            ));
        }
        let Some(pk) = self.public_keys.iter().find(|k| k.id() == cp.key_id) else {
            return Err(format!(
                "the checkpoint is signed by key {}, which is not among the public keys given (--public-key; give every key in use)",
                cp.key_id
            ));
        };
        let time = v.get("time").and_then(|t| t.as_str()).unwrap_or_default();
        if !pk.verifies(
            &signing::checkpoint_message(cp.seq, &cp.link, cp.segment, time),
            &cp.signature,
        ) {
            return Err(format!(
                "the checkpoint's signature does not verify with key {}: it was forged or altered",
                cp.key_id
            ));
        }
        self.checkpoints += 1;
        // The checkpoint record itself is covered too (its signature is its content).
        self.signed_records = self.records + 1;
        Ok(())
    }

    /// One file of the log: `sealed_first` is the first sequence number its name gives (a
    /// sealed segment, which must also end with its own `seal` record).
    fn feed(
        &mut self,
        file: &str,
        reader: impl BufRead,
        sealed_first: Option<u64>,
    ) -> std::io::Result<Result<(), ChainBreak>> {
        self.feed_with(file, reader, sealed_first, &mut |_, _| true)
            .map(|r| r.map(|_| ()))
    }

    /// [`Self::feed`], handing each record that passed its checks to `on`; `on` returning
    /// false stops reading (`Ok(false)`: stopped early).
    pub(super) fn feed_with(
        &mut self,
        file: &str,
        mut reader: impl BufRead,
        sealed_first: Option<u64>,
        on: &mut dyn FnMut(&RecordView<'_>, &[u8]) -> bool,
    ) -> std::io::Result<Result<bool, ChainBreak>> {
        // Lines are bounded so a corrupt log cannot exhaust memory.
        const MAX_LINE: u64 = 1 << 20;
        self.file = file.to_owned();
        self.line_no = 0;
        self.files += 1;
        let mut buf = Vec::new();
        let mut sealed_by: Option<String> = None;
        // The segment's first sequence number, as checkpoints name it.
        let mut segment = sealed_first;
        let brk = |line: u64, reason: String| {
            Ok(Err(ChainBreak {
                file: file.to_owned(),
                line,
                reason,
            }))
        };
        loop {
            buf.clear();
            let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            self.line_no += 1;
            let line_no = self.line_no;
            if !buf.ends_with(b"\n") {
                let reason = if n as u64 == MAX_LINE {
                    "the line is longer than 1 MiB: not a record".into()
                } else {
                    "the line is cut off (no end of line): the log was truncated".into()
                };
                return brk(line_no, reason);
            }
            let line = &buf[..buf.len() - 1];
            if sealed_by.is_some() {
                return brk(
                    line_no,
                    "a record after this segment's seal record: appended to a sealed segment"
                        .into(),
                );
            }
            let Some(v) = RecordView::parse(line) else {
                return brk(line_no, "not a JSON record".into());
            };
            let seq = v.seq;
            if line_no == 1
                && let (Some(want), Some(got)) = (sealed_first, seq)
                && want != got
            {
                return brk(
                    1,
                    format!(
                        "the segment's name says it starts at record {want}, its first record is {got}: segments were renamed or reordered"
                    ),
                );
            }
            if self.records == 0
                && let Some(s) = seq.filter(|s| *s > 0)
            {
                // The oldest records are gone: explained at the end by a `prune` record, or
                // a deletion.
                let p = t(&v.prev).to_owned();
                self.start = Some((s, p.clone(), file.to_owned()));
                self.expect_seq = s;
                self.prev = p;
            }
            if line_no == 1 && segment.is_none() {
                segment = seq;
            }
            if line_no == 1
                && self.records > 0
                && let Some(s) = seq.filter(|s| *s > self.expect_seq)
            {
                return brk(
                    1,
                    format!(
                        "records {} to {} are missing before this segment: a segment was deleted",
                        self.expect_seq,
                        s - 1
                    ),
                );
            }
            if let Err(reason) = check_record(
                &v,
                self.expect_seq,
                &self.prev,
                self.key.as_ref(),
                self.records + 1,
            ) {
                return brk(line_no, reason);
            }
            match v.event.as_deref() {
                Some("seal") => {
                    let named = t(&v.segment);
                    if sealed_first.is_some() && named != file {
                        return brk(
                            line_no,
                            format!(
                                "the seal record names segment {named:?}, not this file: segments were renamed"
                            ),
                        );
                    }
                    sealed_by = Some(named.to_owned());
                }
                Some("checkpoint") if !self.public_keys.is_empty() => {
                    let full = serde_json::from_slice(line).unwrap_or_default();
                    if let Err(reason) = self.check_checkpoint(&full, segment.unwrap_or(0)) {
                        return brk(line_no, reason);
                    }
                }
                Some("prune") => {
                    let full: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
                    if let Some(p) = full
                        .get("pruned")
                        .and_then(|p| serde_json::from_value::<Pruned>(p.clone()).ok())
                    {
                        self.pruned.push(p);
                    }
                }
                _ => {}
            }
            self.prev = link(self.key.as_ref(), line);
            self.expect_seq += 1;
            self.records += 1;
            if !on(&v, line) {
                return Ok(Ok(false));
            }
        }
        if sealed_first.is_some() && sealed_by.is_none() {
            return brk(
                self.line_no + 1,
                "the segment does not end with its seal record: it was truncated".into(),
            );
        }
        Ok(Ok(true))
    }

    pub(super) fn finish(self, allow_missing_head: bool) -> Result<VerifyReport, ChainBreak> {
        if !self.public_keys.is_empty() {
            let brk = |reason: String| ChainBreak {
                file: self.file.clone(),
                line: self.line_no + 1,
                reason,
            };
            if self.checkpoints == 0 {
                return Err(brk(
                    "no signed checkpoint in the log: nothing in it is authenticated by the public keys (was it written with --audit-signing-key?)".into(),
                ));
            }
            if let Some(h) = &self.head {
                let field = |k: &str| h.get(k).and_then(|x| x.as_str()).unwrap_or_default();
                let seq = h.get("seq").and_then(|s| s.as_u64()).unwrap_or(u64::MAX);
                let signed = self
                    .public_keys
                    .iter()
                    .find(|k| k.id() == field("key_id"))
                    .is_some_and(|k| {
                        k.verifies(&signing::head_message(seq, field("hash")), field("sig"))
                    });
                if !signed {
                    return Err(brk(
                        "the head anchor is not signed by any of the given public keys: it was forged or altered".into(),
                    ));
                }
            }
        }
        let (checkpoints, after_last_checkpoint) = if self.public_keys.is_empty() {
            (0, 0)
        } else {
            (self.checkpoints, self.records - self.signed_records)
        };
        let mut pruned_through = None;
        if let Some((s, p, file)) = self.start.as_ref().filter(|_| !self.from_middle) {
            let exact = self
                .pruned
                .iter()
                .any(|pr| pr.through_seq + 1 == *s && pr.link == *p);
            // Retention deletes oldest first after its record: a crash in between leaves
            // some of the named segments, the oldest of them first.
            let interrupted = self.pruned.iter().any(|pr| pr.segments.contains(file));
            if !(exact || interrupted) {
                return Err(ChainBreak {
                    file: file.clone(),
                    line: 1,
                    reason: format!(
                        "the log starts at record {s}: records 0 to {} are missing and no prune record names them (deleted, not pruned by retention)",
                        s - 1
                    ),
                });
            }
            pruned_through = Some(s - 1);
        }
        let mut report = check_head(
            self.head,
            self.key.as_ref(),
            allow_missing_head,
            self.expect_seq,
            &self.prev,
            self.line_no,
        )
        .map_err(|mut b| {
            b.file = self.file.clone();
            b
        })?;
        report.records = self.records;
        report.segments = self.files;
        report.pruned_through = pruned_through;
        report.checkpoints = checkpoints;
        report.after_last_checkpoint = after_last_checkpoint;
        Ok(report)
    }
}

/// One record: JSON, the expected sequence number, linked to the line before it.
fn check_record(
    v: &RecordView<'_>,
    expect_seq: u64,
    prev: &str,
    key: Option<&AuditKey>,
    line_no: u64,
) -> Result<(), String> {
    let seq = v.seq;
    let rec_prev = v.prev.as_deref();
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
        return Err(reason);
    }
    if rec_prev != Some(prev) {
        let reason = match key {
            Some(_) if line_no > 1 => {
                "the MAC of the previous record does not match: the previous line was edited or forged, records were reordered, or the key is wrong"
            }
            _ => {
                "the hash of the previous record does not match: the previous line was edited, or records were reordered"
            }
        };
        return Err(reason.into());
    }
    Ok(())
}

/// The head anchor against the end of the log: what was cut off, edited or appended after it.
fn check_head(
    head: Option<serde_json::Value>,
    key: Option<&AuditKey>,
    allow_missing_head: bool,
    expect_seq: u64,
    prev: &str,
    line_no: u64,
) -> Result<VerifyReport, ChainBreak> {
    let brk = |line: u64, reason: String| ChainBreak {
        file: String::new(),
        line,
        reason,
    };
    let Some(head) = head else {
        if allow_missing_head {
            return Ok(VerifyReport {
                records: expect_seq,
                anchored: false,
                ..Default::default()
            });
        }
        return Err(brk(
            line_no + 1,
            "the head anchor (<log>.head) is missing: records cut off the end cannot be detected without it (--allow-missing-head accepts that)".into(),
        ));
    };
    let (Some(hseq), Some(hhash)) = (
        head.get("seq").and_then(|s| s.as_u64()),
        head.get("hash").and_then(|h| h.as_str()),
    ) else {
        return Err(brk(line_no + 1, "the head anchor is unreadable".into()));
    };
    if let Some(k) = key
        && head.get("mac").and_then(|m| m.as_str()) != Some(head_mac(k, hseq, hhash).as_str())
    {
        return Err(brk(
            line_no + 1,
            "the head anchor's MAC does not match: it was forged or the key is wrong".into(),
        ));
    }
    if expect_seq <= hseq {
        return Err(brk(
            line_no + 1,
            format!(
                "the log ends at record {} but the head anchor records {hseq}: records were cut off the end",
                expect_seq as i64 - 1
            ),
        ));
    }
    // The record the anchor names must be the one in the log.
    let beyond = expect_seq - hseq - 1;
    if beyond == 0 && hhash != prev {
        return Err(brk(
            line_no,
            "the last record does not match the head anchor: it was edited".into(),
        ));
    }
    if beyond > 0 && key.is_none() {
        return Err(brk(
            line_no + 1 - beyond,
            format!(
                "{beyond} records follow the record the head anchor names ({hseq}): appended after the anchor, or written just before a crash; without a key they cannot be told apart from forged ones"
            ),
        ));
    }
    Ok(VerifyReport {
        records: expect_seq,
        anchored: true,
        beyond_head: beyond,
        ..Default::default()
    })
}
