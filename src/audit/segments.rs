//! Segments: the node's log rotates into sealed files whose chain runs on across them.
//!
//! ```text
//! <log>                              the active segment, appended to
//! <log>.head                         the head anchor: the last record written, in any segment
//! <log>.00000000000000004096         a sealed segment (named by its first sequence number):
//!                                    its records, the last of them its `seal` record
//! ```
//!
//! - **Sealing** (by size or age): a `seal` record naming the file the segment becomes ends it
//!   and is synced; the file is renamed; a new active file begins, and its first record links
//!   to the `seal` record like any next record. A crash after the `seal` record and before the
//!   rename is completed at the next start (the rename is the only step left).
//! - **Retention** deletes whole, oldest sealed segments, by total size and by age, only after
//!   a synced `prune` record has named them, the last sequence number they held and the link of
//!   their last record: verification then tells pruning (the first record kept links to what a
//!   `prune` record names) from deletion (nothing explains the missing records).

use super::*;

/// When segments are sealed and how many are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Seal the active segment once it holds this many bytes.
    pub max_segment_bytes: u64,
    /// ... or once its first record is this old (checked at each write).
    pub max_segment_age: Duration,
    /// Delete the oldest sealed segments while all segments together exceed this.
    pub retain_bytes: Option<u64>,
    /// ... and sealed segments whose last write is older than this.
    pub retain_age: Option<Duration>,
}

impl Default for Rotation {
    /// 64 MiB or a day per segment; 1 GiB and 90 days kept: a node's disk holds it, and a
    /// quarter of reads is there for an auditor.
    fn default() -> Self {
        Self {
            max_segment_bytes: 64 << 20,
            max_segment_age: Duration::from_secs(24 * 3600),
            retain_bytes: Some(1 << 30),
            retain_age: Some(Duration::from_secs(90 * 24 * 3600)),
        }
    }
}

impl Rotation {
    /// Refuses settings that would delete a segment as soon as it is sealed.
    pub fn check(&self) -> Result<(), String> {
        if self.max_segment_bytes < 4096 {
            return Err("--audit-max-segment-bytes must be at least 4096".into());
        }
        if let Some(b) = self.retain_bytes
            && b < 2 * self.max_segment_bytes
        {
            return Err(format!(
                "--audit-retain keeps {b} bytes, less than two segments of --audit-max-segment-bytes {}: every sealed segment would be deleted at once; keep more or make segments smaller",
                self.max_segment_bytes
            ));
        }
        Ok(())
    }
}

/// A sealed segment on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// The sequence number its name says its first record has.
    pub first_seq: u64,
}

/// The file a segment starting at `first_seq` is sealed as.
pub fn sealed_path(log: &Path, first_seq: u64) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(format!(".{first_seq:020}"));
    PathBuf::from(p)
}

/// The sealed segments of the log at `log`, oldest first.
pub fn sealed_segments(log: &Path) -> std::io::Result<Vec<Segment>> {
    let dir = match log.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let Some(name) = log.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let f = e.file_name().to_string_lossy().into_owned();
        if let Some(num) = f.strip_prefix(&name).and_then(|r| r.strip_prefix('.'))
            && num.len() == 20
            && num.bytes().all(|b| b.is_ascii_digit())
            && let Ok(first_seq) = num.parse()
        {
            out.push(Segment {
                path: dir.join(&f),
                first_seq,
            });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// The first and the last complete line of a file (at most the last MiB is read for the
/// last), without their newlines.
pub(super) fn first_and_last_line(path: &Path) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut f = File::open(path)?;
    let mut first = Vec::new();
    BufReader::new(&mut f)
        .take(1 << 20)
        .read_until(b'\n', &mut first)?;
    if first.last() == Some(&b'\n') {
        first.pop();
    }
    let len = f.seek(SeekFrom::End(0))?;
    let window = len.min(1 << 20);
    f.seek(SeekFrom::Start(len - window))?;
    let mut buf = Vec::with_capacity(window as usize);
    f.read_to_end(&mut buf)?;
    while buf.last() == Some(&b'\n') {
        buf.pop();
    }
    let start = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok((first, buf[start..].to_vec()))
}

/// The fields of a record line the segment logic needs.
pub(super) struct LineInfo {
    pub(super) seq: u64,
    pub(super) event: Option<String>,
    pub(super) segment: Option<String>,
    pub(super) time: Option<String>,
}

pub(super) fn line_info(line: &[u8]) -> Option<LineInfo> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    Some(LineInfo {
        seq: v.get("seq")?.as_u64()?,
        event: s("event"),
        segment: s("segment"),
        time: s("time"),
    })
}

/// Syncs the directory holding `path` (a rename or an unlink there is then durable).
pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// A crash after a `seal` record and before its rename left the sealed segment under the
/// active name: finish the rename. Returns whether one was finished.
pub(super) fn finish_interrupted_seal(log: &Path) -> std::io::Result<bool> {
    let (_, last) = match first_and_last_line(log) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(info) = line_info(&last) else {
        return Ok(false);
    };
    if info.event.as_deref() != Some("seal") {
        return Ok(false);
    }
    let Some(name) = info.segment.filter(|n| !n.contains('/')) else {
        return Ok(false);
    };
    let target = log.with_file_name(&name);
    if target.exists() {
        return Err(std::io::Error::other(format!(
            "{} ends with the seal record of segment {name}, which exists already: move one of them aside",
            log.display()
        )));
    }
    std::fs::rename(log, &target)?;
    sync_dir(log);
    Ok(true)
}

/// The active segment's state in the writer.
pub(super) struct Active {
    pub(super) log: PathBuf,
    pub(super) rotation: Rotation,
    /// Sequence number of the active segment's first record (the next one when empty).
    pub(super) first_seq: u64,
    /// When its first record was written (now, when empty).
    pub(super) started: SystemTime,
}

impl Active {
    /// The state of the active file at `log` (its first record, if any), continuing at `seq`.
    pub(super) fn of(log: &Path, rotation: Rotation, seq: u64) -> Self {
        let first = first_and_last_line(log)
            .ok()
            .and_then(|(first, _)| line_info(&first));
        let (first_seq, started) = match first {
            Some(i) => (
                i.seq,
                i.time
                    .and_then(|t| humantime::parse_rfc3339(&t).ok())
                    .unwrap_or_else(SystemTime::now),
            ),
            None => (seq, SystemTime::now()),
        };
        Self {
            log: log.to_owned(),
            rotation,
            first_seq,
            started,
        }
    }

    pub(super) fn due(&self, len: u64) -> bool {
        len >= self.rotation.max_segment_bytes
            || (len > 0
                && self.started.elapsed().unwrap_or_default() >= self.rotation.max_segment_age)
    }

    /// The oldest sealed segments retention deletes now, given the active file's length.
    pub(super) fn doomed(&self, active_len: u64) -> Vec<Segment> {
        let Ok(segs) = sealed_segments(&self.log) else {
            return Vec::new();
        };
        let sized: Vec<(Segment, u64, Option<SystemTime>)> = segs
            .into_iter()
            .filter_map(|s| {
                let m = std::fs::metadata(&s.path).ok()?;
                Some((s, m.len(), m.modified().ok()))
            })
            .collect();
        let mut total: u64 = active_len + sized.iter().map(|(_, n, _)| n).sum::<u64>();
        let mut out = Vec::new();
        for (s, n, modified) in sized {
            let over = self.rotation.retain_bytes.is_some_and(|b| total > b);
            let old = self
                .rotation
                .retain_age
                .is_some_and(|a| modified.is_some_and(|m| m.elapsed().unwrap_or_default() > a));
            if !(over || old) {
                break;
            }
            total -= n;
            out.push(s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_names_sort_by_first_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        for n in [4096u64, 0, 123_456_789] {
            std::fs::write(sealed_path(&log, n), "").unwrap();
        }
        std::fs::write(dir.path().join("audit.jsonl.head"), "").unwrap();
        std::fs::write(dir.path().join("audit.jsonl.1"), "").unwrap();
        std::fs::write(dir.path().join("other.jsonl.00000000000000000000"), "").unwrap();
        let got: Vec<u64> = sealed_segments(&log)
            .unwrap()
            .iter()
            .map(|s| s.first_seq)
            .collect();
        assert_eq!(got, [0, 4096, 123_456_789]);
        assert!(
            sealed_path(&log, 7)
                .to_string_lossy()
                .ends_with("audit.jsonl.00000000000000000007")
        );
    }

    #[test]
    fn settings_that_would_delete_every_segment_are_refused() {
        assert!(Rotation::default().check().is_ok());
        let r = Rotation {
            retain_bytes: Some(100 << 20),
            ..Rotation::default()
        };
        assert!(r.check().unwrap_err().contains("two segments"));
    }
}
