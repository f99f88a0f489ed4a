//! Offline verification of a log and its head anchor (`keybroker audit verify`).

use super::scan::{First, Line, ScanKeys, Scanned, check_link, in_order, scan_file};
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
/// (`path` itself), and the head anchor. Every line is parsed; segments are scanned on every
/// core and joined in order.
pub fn verify(
    path: &Path,
    opts: &VerifyOptions,
) -> Result<Result<VerifyReport, ChainBreak>, AuditError> {
    let open_err = |p: &Path, e: std::io::Error| AuditError::Open {
        path: p.to_owned(),
        error: e.to_string(),
    };
    let mut files: Vec<(PathBuf, Option<u64>)> = sealed_segments(path)
        .map_err(|e| open_err(path, e))?
        .into_iter()
        .map(|s| (s.path, Some(s.first_seq)))
        .collect();
    match std::fs::metadata(path) {
        Ok(_) => files.push((path.to_owned(), None)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !files.is_empty() => {}
        Err(e) => return Err(open_err(path, e)),
    }
    let head = match std::fs::read_to_string(head_path(path)) {
        Ok(h) => Some(h),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(open_err(&head_path(path), e)),
    };
    let mut v = match Verifier::new(head.as_deref(), opts) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    match v.read_files(
        &files,
        super::scan::threads(),
        &|_| true,
        &|_| Decision::Pass,
        &mut |_, _| {},
    )? {
        Ok(_) => Ok(v.finish(opts.allow_missing_head)),
        Err(b) => Ok(Err(b)),
    }
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
    if let Err(b) = v.feed_with("", reader, None, &|_| true, &mut |_, _| true)? {
        return Ok(Err(b));
    }
    Ok(v.finish(opts.allow_missing_head))
}

/// The chain across the files of one log, joined in order: each file's first record must
/// follow the last record of the file before; what is inside a file is checked by its scan
/// ([`scan_file`]).
pub(super) struct Verifier {
    keys: Arc<ScanKeys>,
    head: Option<serde_json::Value>,
    prev: String,
    expect_seq: u64,
    /// Records joined so far, and the last file's name and line count.
    records: u64,
    file: String,
    line_no: u64,
    files: u64,
    /// The log's first record when it is not record 0: (seq, its prev, file).
    start: Option<(u64, String, String)>,
    /// Every `prune` record's claim.
    pruned: Vec<Pruned>,
    checkpoints: u64,
    /// Records counted up to and including the last checkpoint.
    signed_records: u64,
    /// Fed from a segment in the middle of the log (a query from a time on): the first
    /// record's link is taken as it is.
    pub(super) from_middle: bool,
}

/// What a reader of the log does with a record it was handed (before the record is parsed
/// in full, when `parse` let it be skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Not wanted; read on.
    Pass,
    /// Hand it to the consumer, in order.
    Keep,
    /// Stop reading here (the chain is then verified up to this record).
    Stop,
}

/// Records a file's scan keeps for the consumer before they are handed over in order; past
/// this the file is read again, one record at a time, when its turn comes.
const KEEP_PER_FILE: usize = if cfg!(test) { 2 << 10 } else { 8 << 20 };

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
            keys: Arc::new(ScanKeys {
                key,
                public_keys: opts.public_keys.clone(),
            }),
            head,
            prev: GENESIS.to_owned(),
            expect_seq: 0,
            records: 0,
            file: String::new(),
            line_no: 0,
            files: 0,
            start: None,
            pruned: Vec::new(),
            checkpoints: 0,
            signed_records: 0,
            from_middle: false,
        })
    }

    /// A file's first record against the last record of the files before it.
    fn check_first(&mut self, file: &str, f: &First) -> Result<(), ChainBreak> {
        let brk = |reason: String| ChainBreak {
            file: file.to_owned(),
            line: 1,
            reason,
        };
        if self.records == 0
            && let Some(s) = f.seq.filter(|s| *s > 0)
        {
            // The oldest records are gone: explained at the end by a `prune` record, or a
            // deletion.
            self.start = Some((s, f.prev.clone(), file.to_owned()));
            self.expect_seq = s;
            self.prev = f.prev.clone();
        }
        if self.records > 0
            && let Some(s) = f.seq.filter(|s| *s > self.expect_seq)
        {
            return Err(brk(format!(
                "records {} to {} are missing before this segment: a segment was deleted",
                self.expect_seq,
                s - 1
            )));
        }
        check_link(
            f.seq,
            Some(&f.prev),
            self.expect_seq,
            &self.prev,
            self.keys.key.is_some() && self.records > 0,
        )
        .map_err(brk)
    }

    /// A scanned file's place in the chain: its first record follows the files before (unless
    /// the scan checked that already, `first_checked`).
    fn join_first(&mut self, sc: &Scanned, first_checked: bool) -> Result<(), ChainBreak> {
        self.files += 1;
        self.file.clone_from(&sc.sum.name);
        self.line_no = sc.sum.lines;
        match &sc.sum.first {
            Some(f) if !first_checked => self.check_first(&sc.sum.name, f),
            _ => Ok(()),
        }
    }

    /// The rest of a scanned file: its own break, if it had one, or what it adds to the chain.
    fn join_rest(&mut self, sc: Scanned) -> Result<(), ChainBreak> {
        if let Some(b) = sc.brk {
            // Counted as read (nothing is joined after a break).
            self.records += sc.sum.records;
            return Err(b);
        }
        let sum = sc.sum;
        if sum.records > 0 {
            if let Some(n) = sum.signed {
                self.signed_records = self.records + n;
            }
            self.records += sum.records;
            self.expect_seq = sum.end_seq;
            self.prev = sum.last_link;
        }
        self.checkpoints += sum.checkpoints;
        self.pruned.extend(sum.pruned);
        Ok(())
    }

    /// Records read so far (those that passed their checks).
    pub(super) fn records_read(&self) -> u64 {
        self.records
    }

    /// Files joined so far (the one a break was found in included).
    pub(super) fn files_read(&self) -> u64 {
        self.files
    }

    /// One file read in order, each record handed to `on` as soon as it is checked; `on`
    /// returning false stops (`Ok(false)`: stopped early).
    pub(super) fn feed_with(
        &mut self,
        file: &str,
        reader: impl BufRead,
        sealed_first: Option<u64>,
        parse: &dyn Fn(&[u8]) -> bool,
        on: &mut dyn FnMut(Line<'_>, &[u8]) -> bool,
    ) -> std::io::Result<Result<bool, ChainBreak>> {
        let keys = self.keys.clone();
        let sc = scan_file(
            reader,
            file,
            sealed_first,
            &keys,
            parse,
            &mut |f| self.check_first(file, f),
            on,
        )?;
        let stopped = sc.stopped;
        Ok(self
            .join_first(&sc, true)
            .and_then(|()| self.join_rest(sc))
            .map(|()| !stopped))
    }

    /// The files of a log (sealed segments with their first sequence number, then the active
    /// file), read in order: every record is checked, `decide` (called on the reading thread)
    /// picks the ones `out` gets, in the log's order. With more than one thread, files are
    /// scanned at once and joined in order. `Ok(Ok(false))`: `decide` stopped the read.
    pub(super) fn read_files(
        &mut self,
        files: &[(PathBuf, Option<u64>)],
        threads: usize,
        parse: &(dyn Fn(&[u8]) -> bool + Sync),
        decide: &(dyn Fn(&Line<'_>) -> Decision + Sync),
        out: &mut dyn FnMut(&RecordView<'_>, &[u8]),
    ) -> Result<Result<bool, ChainBreak>, AuditError> {
        let open = |p: &Path| {
            File::open(p)
                .map(|f| BufReader::with_capacity(1 << 16, f))
                .map_err(|e| AuditError::Open {
                    path: p.to_owned(),
                    error: e.to_string(),
                })
        };
        let io_err = |p: &Path, e: std::io::Error| AuditError::Open {
            path: p.to_owned(),
            error: e.to_string(),
        };
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        // One file as it comes: records go to `out` as soon as they are checked.
        let in_turn = |v: &mut Verifier,
                       (path, sealed_first): &(PathBuf, Option<u64>),
                       out: &mut dyn FnMut(&RecordView<'_>, &[u8])| {
            let mut on = |l: Line<'_>, line: &[u8]| match decide(&l) {
                Decision::Pass => true,
                Decision::Keep => {
                    emit(&l, line, out);
                    true
                }
                Decision::Stop => false,
            };
            v.feed_with(&name(path), open(path)?, *sealed_first, parse, &mut on)
                .map_err(|e| io_err(path, e))
        };
        if threads <= 1 || files.len() <= 1 {
            for f in files {
                match in_turn(self, f, out)? {
                    Ok(true) => {}
                    other => return Ok(other),
                }
            }
            return Ok(Ok(true));
        }
        // Each file scanned on its own; what it keeps waits for its turn.
        struct Kept {
            scanned: Scanned,
            lines: Vec<u8>,
            ends: Vec<usize>,
            /// More than KEEP_PER_FILE kept: read the file again in its turn.
            overflow: bool,
            stopped: bool,
        }
        let keys = self.keys.clone();
        let scan = |i: usize| -> Result<Kept, AuditError> {
            let (path, sealed_first) = &files[i];
            let (mut lines, mut ends) = (Vec::new(), Vec::new());
            let (mut overflow, mut stopped) = (false, false);
            let mut on = |l: Line<'_>, line: &[u8]| match decide(&l) {
                Decision::Pass => true,
                Decision::Keep if lines.len() + line.len() > KEEP_PER_FILE => {
                    overflow = true;
                    false
                }
                Decision::Keep => {
                    lines.extend_from_slice(line);
                    ends.push(lines.len());
                    true
                }
                Decision::Stop => {
                    stopped = true;
                    false
                }
            };
            let scanned = scan_file(
                open(path)?,
                &name(path),
                *sealed_first,
                &keys,
                parse,
                &mut |_| Ok(()),
                &mut on,
            )
            .map_err(|e| io_err(path, e))?;
            Ok(Kept {
                scanned,
                lines,
                ends,
                overflow,
                stopped,
            })
        };
        let mut result = Ok(Ok(true));
        in_order(files.len(), threads, threads + 1, scan, |i, kept| {
            let kept = match kept {
                Ok(k) => k,
                Err(e) => {
                    result = Err(e);
                    return false;
                }
            };
            if kept.overflow {
                result = in_turn(self, &files[i], out);
                return matches!(result, Ok(Ok(true)));
            }
            if let Err(b) = self.join_first(&kept.scanned, false) {
                result = Ok(Err(b));
                return false;
            }
            let mut from = 0;
            for end in kept.ends {
                let line = &kept.lines[from..end];
                if let Some(v) = RecordView::parse(line) {
                    out(&v, line);
                }
                from = end;
            }
            if let Err(b) = self.join_rest(kept.scanned) {
                result = Ok(Err(b));
                return false;
            }
            if kept.stopped {
                result = Ok(Ok(false));
                return false;
            }
            true
        });
        result
    }

    pub(super) fn finish(self, allow_missing_head: bool) -> Result<VerifyReport, ChainBreak> {
        if !self.keys.public_keys.is_empty() {
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
                    .keys
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
        let (checkpoints, after_last_checkpoint) = if self.keys.public_keys.is_empty() {
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
            self.keys.key.as_ref(),
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

/// Hands a kept record to the consumer (parsed now if the scan skipped its fields).
fn emit(l: &Line<'_>, line: &[u8], out: &mut dyn FnMut(&RecordView<'_>, &[u8])) {
    match l {
        Line::Parsed(v) => out(v, line),
        Line::Skipped { .. } => {
            if let Some(v) = RecordView::parse(line) {
                out(&v, line);
            }
        }
    }
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
