//! `keybroker audit query`: the records an incident responder asks for ("who read the
//! production database password last week, and was any of them not the application?"), read
//! in order across segments in one pass that also verifies the chain of what it read.
//!
//! Sealed segments that end before `since` are skipped (only their last line is read); the
//! first segment read is then taken as it is (its first link cannot be checked without the
//! ones before), and reading stops a minute past `until` (records are stamped by their
//! producers, so the order of times may differ from the order of records by a little).

use super::scan::{self, Line};
use super::verify::{Decision, Verifier};
use super::*;

/// Which records to print. Every field set must match; unset fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// RFC 3339 bounds, compared as the records write them (UTC, microseconds).
    pub since: Option<String>,
    pub until: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub service_account: Option<String>,
    /// An object name, or a prefix ending in `*`.
    pub object: Option<String>,
    pub file: Option<String>,
    pub event: Option<String>,
    pub outcome: Option<String>,
    /// The reader's command name.
    pub process: Option<String>,
    /// The reader's executable path.
    pub exe: Option<String>,
    /// A container id, or its first characters.
    pub container: Option<String>,
    /// Only reads by processes outside the volume's pod (another pod, the node).
    pub outside_pod: bool,
}

impl Filter {
    pub fn matches(&self, v: &RecordView<'_>) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| got == w);
        let time = v.time();
        self.since.as_deref().is_none_or(|s| time >= s)
            && self.until.as_deref().is_none_or(|u| time <= u)
            && eq(&self.namespace, v.namespace())
            && eq(&self.pod, v.pod_name())
            && eq(&self.service_account, v.service_account())
            && self.object.as_deref().is_none_or(|o| {
                let got = t(&v.object);
                match o.strip_suffix('*') {
                    Some(prefix) => !got.is_empty() && got.starts_with(prefix),
                    None => got == o,
                }
            })
            && eq(&self.file, t(&v.file))
            && eq(&self.event, v.event())
            && eq(&self.outcome, t(&v.outcome))
            && eq(&self.process, v.comm())
            && eq(&self.exe, v.exe())
            && self
                .container
                .as_deref()
                .is_none_or(|c| !v.container().is_empty() && v.container().starts_with(c))
            && (!self.outside_pod || outside_pod(v))
    }
}

impl Filter {
    /// Byte strings every line this filter can match contains (as the writer encodes them):
    /// lines without all of them need not be parsed.
    fn needles(&self) -> Vec<Vec<u8>> {
        let quoted = |v: &str| serde_json::to_vec(v).unwrap_or_default();
        // A prefix: its encoding without the closing quote.
        let prefix = |v: &str| {
            let mut q = quoted(v);
            q.pop();
            q
        };
        let mut n = Vec::new();
        for v in [
            &self.namespace,
            &self.pod,
            &self.service_account,
            &self.file,
            &self.event,
            &self.outcome,
            &self.process,
            &self.exe,
        ]
        .into_iter()
        .flatten()
        .filter(|v| !v.is_empty())
        {
            n.push(quoted(v));
        }
        match self.object.as_deref().map(|o| (o, o.strip_suffix('*'))) {
            Some((_, Some(p))) if !p.is_empty() => n.push(prefix(p)),
            Some((o, None)) if !o.is_empty() => n.push(quoted(o)),
            _ => {}
        }
        if let Some(c) = self.container.as_deref().filter(|c| !c.is_empty()) {
            n.push(prefix(c));
        }
        if self.outside_pod {
            n.push(quoted("read"));
        }
        // (An empty value matches a missing field: it has no bytes to look for.)
        n
    }
}

/// A read of a pod's volume by a process that is not in that pod (or in none).
pub fn outside_pod(v: &RecordView<'_>) -> bool {
    v.event() == "read" && !v.pod_uid().is_empty() && v.reader_pod_uid() != Some(v.pod_uid())
}

/// What a query read and whether it verified.
#[derive(Debug)]
pub struct QueryReport {
    pub read: u64,
    pub matched: u64,
    pub segments_read: u64,
    /// Sealed segments skipped as wholly before `since`.
    pub segments_skipped: u64,
    /// Read to the end of the log (the head anchor was checked too).
    pub to_the_end: bool,
    /// The chain of what was read: intact (the report of a complete read, if it was one), or
    /// where it broke (nothing after that was read).
    pub verified: Result<Option<VerifyReport>, ChainBreak>,
}

/// Reads the log at `path` (its sealed segments, then the active file), verifying the chain of
/// what it reads, and hands every record `filter` matches to `out`, in the log's order.
/// `threads`: segments scanned at once (0: every core); 1 reads one record at a time, in
/// memory that does not grow with what matches (the report's way).
pub fn query(
    path: &Path,
    opts: &VerifyOptions,
    filter: &Filter,
    threads: usize,
    out: &mut dyn FnMut(&RecordView<'_>, &[u8]),
) -> Result<QueryReport, AuditError> {
    let threads = if threads == 0 {
        scan::threads()
    } else {
        threads
    };
    let open_err = |p: &Path, e: std::io::Error| AuditError::Open {
        path: p.to_owned(),
        error: e.to_string(),
    };
    let mut files: Vec<(PathBuf, Option<u64>)> = sealed_segments(path)
        .map_err(|e| open_err(path, e))?
        .into_iter()
        .map(|s| (s.path, Some(s.first_seq)))
        .collect();
    if path.exists() || files.is_empty() {
        files.push((path.to_owned(), None));
    }
    let mut report = QueryReport {
        read: 0,
        matched: 0,
        segments_read: 0,
        segments_skipped: 0,
        to_the_end: false,
        verified: Ok(None),
    };
    // Sealed segments wholly before `since`: their last record (the seal) is older.
    if let Some(since) = &filter.since {
        while files.len() > 1 {
            let (_, last) =
                segments::first_and_last_line(&files[0].0).map_err(|e| open_err(&files[0].0, e))?;
            let ended = segments::line_info(&last).and_then(|i| i.time);
            if ended.is_some_and(|t| t < *since) {
                files.remove(0);
                report.segments_skipped += 1;
            } else {
                break;
            }
        }
    }
    let head = std::fs::read_to_string(head_path(path)).ok();
    let mut v = match Verifier::new(head.as_deref(), opts) {
        Ok(v) => v,
        Err(b) => {
            report.verified = Err(b);
            return Ok(report);
        }
    };
    v.from_middle = report.segments_skipped > 0;
    // Reading stops a minute past `until`.
    let stop_after = filter.until.as_deref().and_then(|u| {
        humantime::parse_rfc3339_weak(u)
            .ok()
            .map(|t| humantime::format_rfc3339_micros(t + Duration::from_secs(60)).to_string())
    });
    let needles = filter.needles();
    let parse = scan::prefilter(&needles);
    let decide = |l: &Line<'_>| {
        if stop_after.as_deref().is_some_and(|s| l.time() > s) {
            return Decision::Stop;
        }
        match l {
            Line::Parsed(rec) if filter.matches(rec) => Decision::Keep,
            _ => Decision::Pass,
        }
    };
    let mut matched = 0u64;
    let mut counted = |rec: &RecordView<'_>, line: &[u8]| {
        matched += 1;
        out(rec, line);
    };
    let r = v.read_files(&files, threads, &parse, &decide, &mut counted)?;
    (report.read, report.matched) = (v.records_read(), matched);
    report.segments_read = v.files_read();
    match r {
        Ok(true) => {
            report.to_the_end = true;
            report.verified = v.finish(opts.allow_missing_head).map(Some);
        }
        Ok(false) => {}
        Err(b) => report.verified = Err(b),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_what_an_auditor_asks() {
        let line = br#"{"time":"2026-12-06T10:00:00.000000Z","event":"read","outcome":"success","object":"secret/prod-db","file":"password","pod":{"namespace":"payments","name":"api-1","uid":"u1","service_account":"api"},"process":{"pid":7,"uid":0,"gid":0,"comm":"cat","exe":"/usr/bin/cat","pod_uid":"u2","container":"abcdef"}}"#;
        let r = RecordView::parse(line).unwrap();
        let f = |edit: fn(&mut Filter)| {
            let mut f = Filter::default();
            edit(&mut f);
            f.matches(&r)
        };
        assert!(f(|_| {}));
        assert!(f(|f| f.namespace = Some("payments".into())));
        assert!(!f(|f| f.namespace = Some("orders".into())));
        assert!(f(|f| f.object = Some("secret/prod-*".into())));
        assert!(!f(|f| f.object = Some("secret/prod".into())));
        assert!(f(|f| f.container = Some("abc".into())));
        assert!(f(|f| f.exe = Some("/usr/bin/cat".into())));
        assert!(f(|f| f.outside_pod = true), "read by a process of pod u2");
        assert!(f(|f| f.since = Some("2026-12-06T09:00:00.000000Z".into())));
        assert!(!f(|f| f.until = Some("2026-12-06T09:00:00.000000Z".into())));
        let inside = String::from_utf8(line.to_vec())
            .unwrap()
            .replace(r#""pod_uid":"u2""#, r#""pod_uid":"u1""#);
        assert!(!outside_pod(&RecordView::parse(inside.as_bytes()).unwrap()));
        let node = String::from_utf8(line.to_vec())
            .unwrap()
            .replace(r#""pod_uid":"u2","#, "");
        assert!(
            outside_pod(&RecordView::parse(node.as_bytes()).unwrap()),
            "a process in no pod"
        );
    }
}
