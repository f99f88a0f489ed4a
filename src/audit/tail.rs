//! Where an existing log's chain continues, and the cut of a torn tail.

use super::*;

/// Where an existing log's chain continues.
pub(super) struct Tail {
    pub(super) seq: u64,
    pub(super) prev: String,
    /// Bytes after the last complete record, cut off.
    pub(super) torn: Option<Torn>,
    /// The last record links to the one before it the way this writer links (same key, or
    /// none on both sides). True when there is nothing to compare.
    pub(super) chain_matches: bool,
    /// `time` of the last complete record (where a previous process stopped writing).
    pub(super) last_time: Option<String>,
}

pub(super) struct Torn {
    pub(super) bytes: u64,
    pub(super) sha256: String,
}

/// Finds the sequence number and link to continue from: those of the last complete record.
/// Anything after it (a torn write, garbage) is cut off the file and reported.
pub(super) fn tail_state(file: &mut File, key: Option<&AuditKey>) -> std::io::Result<Tail> {
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

pub(super) fn cut(
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
