//! One file of the log checked on its own: the links and sequence numbers of its lines after
//! the first, its checkpoints, its seal and its prune records. How the file's first record
//! follows the file before it is the verifier's to check ([`super::verify::Verifier`]), in
//! order, so the files of a long log can be scanned on every core at once.
//!
//! A query needs the fields of only the lines it may print. A line no filter can match is
//! not parsed: its sequence number, time and link are read from where the writer puts them
//! (`{"seq":N,"time":"...",` first, `,"prev":"..."}` last), and its hash is checked like any
//! other. Only lines without a backslash take that path (in them every quote is JSON's own,
//! so these fields cannot be faked by text inside a value); seal, checkpoint and prune records
//! are always parsed. `audit verify` parses every line.

use std::sync::{Condvar, Mutex};

use memchr::memmem;

use super::verify::ChainBreak;
use super::*;

/// The keys every file's checks need.
#[derive(Clone, Default)]
pub(super) struct ScanKeys {
    pub key: Option<AuditKey>,
    pub public_keys: Vec<PublicKey>,
}

/// A file's first record, which the verifier checks against the file before.
#[derive(Clone, Debug)]
pub(super) struct First {
    pub seq: Option<u64>,
    pub prev: String,
}

/// What one file held, as far as it was read.
#[derive(Debug, Default)]
pub(super) struct FileSummary {
    pub name: String,
    /// `None` for an empty file, or one whose first line is not a record.
    pub first: Option<First>,
    pub records: u64,
    /// Lines read (where a break at the end of the file is reported).
    pub lines: u64,
    /// The sequence number after the last record, and the last record's link.
    pub end_seq: u64,
    pub last_link: String,
    pub checkpoints: u64,
    /// Records of this file up to and including its last checkpoint.
    pub signed: Option<u64>,
    pub pruned: Vec<Pruned>,
}

/// One line that passed its checks: parsed, or (a line the caller did not need) its time.
/// Handed over once per line and never stored: boxing the view would allocate per line.
#[allow(clippy::large_enum_variant)]
pub(super) enum Line<'l> {
    Parsed(RecordView<'l>),
    Skipped { time: &'l str },
}

impl Line<'_> {
    pub fn time(&self) -> &str {
        match self {
            Line::Parsed(v) => v.time(),
            Line::Skipped { time } => time,
        }
    }
}

/// What scanning a file found: its summary, the first break (nothing after it was read) and
/// whether the consumer stopped the read.
pub(super) struct Scanned {
    pub sum: FileSummary,
    pub brk: Option<ChainBreak>,
    pub stopped: bool,
}

/// Lines are bounded so a corrupt log cannot exhaust memory.
const MAX_LINE: u64 = 1 << 20;

/// Reads `path` line by line and checks each: `parse` says whether the consumer needs a
/// line's fields, `first` checks the first record against the files before (called right
/// after it is read, before its own checks go on), and `on` gets every line that passed;
/// `on` returning false stops the read.
pub(super) fn scan_file(
    reader: impl BufRead,
    name: &str,
    sealed_first: Option<u64>,
    keys: &ScanKeys,
    parse: &dyn Fn(&[u8]) -> bool,
    first: &mut dyn FnMut(&First) -> Result<(), ChainBreak>,
    on: &mut dyn FnMut(Line<'_>, &[u8]) -> bool,
) -> std::io::Result<Scanned> {
    let mut s = FileScanner {
        keys,
        sealed_first,
        segment: sealed_first,
        sealed_by: false,
        expect_seq: 0,
        prev: String::new(),
        sum: FileSummary {
            name: name.to_owned(),
            ..Default::default()
        },
    };
    let mut reader = reader;
    let mut buf = Vec::new();
    let mut stopped = false;
    let brk = |line, reason: String| ChainBreak {
        file: name.to_owned(),
        line,
        reason,
    };
    loop {
        buf.clear();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        s.sum.lines += 1;
        let line_no = s.sum.lines;
        if !buf.ends_with(b"\n") {
            let reason = if n as u64 == MAX_LINE {
                "the line is longer than 1 MiB: not a record"
            } else {
                "the line is cut off (no end of line): the log was truncated"
            };
            return Ok(s.broken(brk(line_no, reason.into())));
        }
        let line = &buf[..buf.len() - 1];
        let checked = if line_no == 1 {
            s.first_line(line, first)
        } else {
            s.line(line, parse(line))
        };
        match checked {
            Ok(l) => {
                if !on(l, line) {
                    stopped = true;
                    break;
                }
            }
            Err(reason) => return Ok(s.broken(brk(line_no, reason))),
        }
    }
    if !stopped && sealed_first.is_some() && !s.sealed_by {
        let line = s.sum.lines + 1;
        return Ok(s.broken(brk(
            line,
            "the segment does not end with its seal record: it was truncated".into(),
        )));
    }
    Ok(Scanned {
        sum: s.sum,
        brk: None,
        stopped,
    })
}

struct FileScanner<'k> {
    keys: &'k ScanKeys,
    sealed_first: Option<u64>,
    /// The segment's first sequence number, as checkpoints name it.
    segment: Option<u64>,
    sealed_by: bool,
    expect_seq: u64,
    prev: String,
    sum: FileSummary,
}

impl FileScanner<'_> {
    fn broken(self, b: ChainBreak) -> Scanned {
        Scanned {
            sum: self.sum,
            brk: Some(b),
            stopped: false,
        }
    }

    /// The first line: always parsed; its link to the file before is `first`'s to check.
    fn first_line<'l>(
        &mut self,
        line: &'l [u8],
        first: &mut dyn FnMut(&First) -> Result<(), ChainBreak>,
    ) -> Result<Line<'l>, String> {
        let Some(v) = RecordView::parse(line) else {
            return Err("not a JSON record".into());
        };
        if let (Some(want), Some(got)) = (self.sealed_first, v.seq)
            && want != got
        {
            return Err(format!(
                "the segment's name says it starts at record {want}, its first record is {got}: segments were renamed or reordered"
            ));
        }
        let f = First {
            seq: v.seq,
            prev: t(&v.prev).to_owned(),
        };
        self.sum.first = Some(f.clone());
        first(&f).map_err(|b| b.reason)?;
        let Some(seq) = v.seq else {
            return Err("the record has no sequence number".into());
        };
        self.segment = self.segment.or(Some(seq));
        (self.expect_seq, self.prev) = (seq, f.prev);
        self.structural(&v, line)?;
        self.advance(line);
        Ok(Line::Parsed(v))
    }

    /// A line after the first.
    fn line<'l>(&mut self, line: &'l [u8], parse: bool) -> Result<Line<'l>, String> {
        if self.sealed_by {
            return Err(
                "a record after this segment's seal record: appended to a sealed segment".into(),
            );
        }
        if !parse && let Some(f) = fast_fields(line) {
            check_link(
                Some(f.seq),
                Some(f.prev),
                self.expect_seq,
                &self.prev,
                self.keys.key.is_some(),
            )?;
            self.advance(line);
            return Ok(Line::Skipped { time: f.time });
        }
        let Some(v) = RecordView::parse(line) else {
            return Err("not a JSON record".into());
        };
        check_link(
            v.seq,
            v.prev.as_deref(),
            self.expect_seq,
            &self.prev,
            self.keys.key.is_some(),
        )?;
        self.structural(&v, line)?;
        self.advance(line);
        Ok(Line::Parsed(v))
    }

    fn advance(&mut self, line: &[u8]) {
        self.prev = link(self.keys.key.as_ref(), line);
        self.expect_seq += 1;
        self.sum.records += 1;
        self.sum.end_seq = self.expect_seq;
        self.sum.last_link.clone_from(&self.prev);
    }

    /// Seal, checkpoint and prune records.
    fn structural(&mut self, v: &RecordView<'_>, line: &[u8]) -> Result<(), String> {
        match v.event.as_deref() {
            Some("seal") => {
                let named = t(&v.segment);
                if self.sealed_first.is_some() && named != self.sum.name {
                    return Err(format!(
                        "the seal record names segment {named:?}, not this file: segments were renamed"
                    ));
                }
                self.sealed_by = true;
            }
            Some("checkpoint") if !self.keys.public_keys.is_empty() => {
                let full: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
                self.check_checkpoint(&full)?;
            }
            Some("prune") => {
                let full: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
                if let Some(p) = full
                    .get("pruned")
                    .and_then(|p| serde_json::from_value::<Pruned>(p.clone()).ok())
                {
                    self.sum.pruned.push(p);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A `checkpoint` record `v`: it signs the record before it, in this file's segment.
    fn check_checkpoint(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let segment = self.segment.unwrap_or(0);
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
        let Some(pk) = self.keys.public_keys.iter().find(|k| k.id() == cp.key_id) else {
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
        self.sum.checkpoints += 1;
        // The checkpoint record itself is covered too (its signature is its content).
        self.sum.signed = Some(self.sum.records + 1);
        Ok(())
    }
}

/// A record's sequence number and link against what the chain expects. `keyed`: the link is
/// a MAC (what a mismatch means differs).
pub(super) fn check_link(
    seq: Option<u64>,
    rec_prev: Option<&str>,
    expect_seq: u64,
    prev: &str,
    keyed: bool,
) -> Result<(), String> {
    if seq != Some(expect_seq) {
        return Err(match seq {
            Some(s) if s > expect_seq => format!(
                "sequence jumps from {} to {s}: records were deleted",
                expect_seq as i64 - 1
            ),
            Some(s) => format!(
                "sequence goes back to {s} (expected {expect_seq}): records were reordered or duplicated"
            ),
            None => "the record has no sequence number".into(),
        });
    }
    if rec_prev != Some(prev) {
        return Err(if keyed {
            "the MAC of the previous record does not match: the previous line was edited or forged, records were reordered, or the key is wrong"
        } else {
            "the hash of the previous record does not match: the previous line was edited, or records were reordered"
        }
        .into());
    }
    Ok(())
}

/// The fields a skipped line is checked by, where the writer puts them.
#[derive(Debug, PartialEq, Eq)]
struct FastFields<'l> {
    seq: u64,
    time: &'l str,
    prev: &'l str,
}

/// `None` (parse the line) unless the line is backslash-free, starts `{"seq":N,"time":"T",`,
/// ends `,"prev":"P"}`, and is not a seal, checkpoint or prune record.
fn fast_fields(line: &[u8]) -> Option<FastFields<'_>> {
    if memchr::memchr(b'\\', line).is_some() {
        return None;
    }
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let seq: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"time\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    let time = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = &rest[end + 1..];
    // The last value is the link: from the last quote before the closing `"}`.
    let body = line.strip_suffix(b"\"}")?;
    let open = body.iter().rposition(|b| *b == b'"')?;
    if !body[..=open].ends_with(b",\"prev\":\"") {
        return None;
    }
    let prev = std::str::from_utf8(&body[open + 1..]).ok()?;
    // Every quote here is JSON's own: the first "event" key is the record's event.
    static EVENT: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(b"\"event\":\""));
    if let Some(at) = EVENT.find(rest) {
        let ev = &rest[at + 9..];
        let ev = &ev[..memchr::memchr(b'"', ev)?];
        if matches!(ev, b"seal" | b"checkpoint" | b"prune") {
            return None;
        }
    }
    Some(FastFields { seq, time, prev })
}

/// What a filter needs of a line before it is parsed: byte strings that every line it can
/// match contains. A line with a backslash is always parsed (its text may be escaped).
pub(super) fn prefilter(needles: &[Vec<u8>]) -> impl Fn(&[u8]) -> bool + Sync + '_ {
    let finders: Vec<memmem::Finder<'_>> = needles.iter().map(memmem::Finder::new).collect();
    move |line: &[u8]| finders.iter().all(|f| f.find(line).is_some())
}

/// Runs `work` over `0..n` on up to `threads` threads and hands the results to `take` in
/// order, at most `window` items ahead of it (memory stays bounded). `take` returning false
/// stops: items not begun are not run. A panic in `work` is raised again here.
pub(super) fn in_order<T: Send>(
    n: usize,
    threads: usize,
    window: usize,
    work: impl Fn(usize) -> T + Sync,
    mut take: impl FnMut(usize, T) -> bool,
) {
    struct State<T> {
        next: usize,
        taken: usize,
        done: std::collections::BTreeMap<usize, std::thread::Result<T>>,
        stop: bool,
    }
    let state = Mutex::new(State {
        next: 0,
        taken: 0,
        done: Default::default(),
        stop: false,
    });
    let cv = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let window = window.max(1);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut s = lock();
                        while !s.stop && s.next < n && s.next >= s.taken + window {
                            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
                        }
                        if s.stop || s.next >= n {
                            return;
                        }
                        s.next += 1;
                        s.next - 1
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(i)));
                    lock().done.insert(i, r);
                    cv.notify_all();
                }
            });
        }
        for i in 0..n {
            let r = {
                let mut s = lock();
                loop {
                    if let Some(r) = s.done.remove(&i) {
                        s.taken = i + 1;
                        break r;
                    }
                    s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            cv.notify_all();
            let go_on = match r {
                Ok(r) => take(i, r),
                Err(p) => {
                    lock().stop = true;
                    cv.notify_all();
                    std::panic::resume_unwind(p);
                }
            };
            if !go_on {
                break;
            }
        }
        lock().stop = true;
        cv.notify_all();
    });
}

/// Threads for reading a log: every core, up to 8.
pub(super) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_lines_the_writer_wrote_skip_the_parse() {
        let p = "a".repeat(64);
        let read = format!(
            r#"{{"seq":12,"time":"2026-12-06T10:00:00.000000Z","schema":2,"event":"read","object":"x","prev":"{p}"}}"#
        );
        assert_eq!(
            fast_fields(read.as_bytes()),
            Some(FastFields {
                seq: 12,
                time: "2026-12-06T10:00:00.000000Z",
                prev: &p
            })
        );
        for structural in ["seal", "checkpoint", "prune"] {
            let l = read.replace(r#""event":"read""#, &format!(r#""event":"{structural}""#));
            assert_eq!(fast_fields(l.as_bytes()), None, "{structural}");
        }
        // A value that looks like a field is escaped: such lines are parsed.
        let l = read.replace(r#""object":"x""#, r#""object":"x\",\"event\":\"seal""#);
        assert_eq!(fast_fields(l.as_bytes()), None);
        for broken in [
            read.replace("{\"seq\":12", "{\"seq\":\"12\""),
            read.replace("\"}", "\" }"),
            read.replace(",\"time\"", ", \"time\""),
            format!("{read} "),
        ] {
            assert_eq!(fast_fields(broken.as_bytes()), None, "{broken}");
        }
    }

    #[test]
    fn results_come_in_order_and_a_stop_ends_the_work() {
        let mut seen = Vec::new();
        in_order(
            50,
            4,
            3,
            |i| {
                std::thread::sleep(Duration::from_micros((50 - i as u64) * 20));
                i * 2
            },
            |i, r| {
                assert_eq!(r, i * 2);
                seen.push(i);
                i < 30
            },
        );
        assert_eq!(seen, (0..=30).collect::<Vec<_>>());
        let empty: Vec<usize> = Vec::new();
        in_order(0, 4, 3, |i| i, |_, _| unreachable!());
        assert!(empty.is_empty());
    }

    #[test]
    #[should_panic(expected = "worker failed")]
    fn a_panic_in_a_worker_reaches_the_caller() {
        in_order(
            10,
            2,
            2,
            |i| {
                if i == 3 {
                    panic!("worker failed");
                }
                i
            },
            |_, _| true,
        );
    }
}
