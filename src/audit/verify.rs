//! Offline verification of a log and its head anchor (`keybroker audit verify`).

use super::*;

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
        if let Err(reason) = check_record(line, expect_seq, &prev, key, line_no) {
            return brk(line_no, reason);
        }
        prev = link(key, line);
        expect_seq += 1;
    }
    Ok(check_head(
        head,
        key,
        opts.allow_missing_head,
        expect_seq,
        &prev,
        line_no,
    ))
}

/// One record: JSON, the expected sequence number, linked to the line before it.
fn check_record(
    line: &[u8],
    expect_seq: u64,
    prev: &str,
    key: Option<&AuditKey>,
    line_no: u64,
) -> Result<(), String> {
    let v: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return Err("not a JSON record".into()),
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
    let brk = |line: u64, reason: String| ChainBreak { line, reason };
    let Some(head) = head else {
        if allow_missing_head {
            return Ok(VerifyReport {
                records: expect_seq,
                anchored: false,
                beyond_head: 0,
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
    })
}
