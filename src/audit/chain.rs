//! How records are linked: SHA-256, or HMAC-SHA256 with a key; the head anchor's MAC.

use super::*;

/// The version of docs/audit-record.schema.json every record names (`schema`).
pub const SCHEMA: u32 = 2;

/// The record as written: the event plus chain fields.
#[derive(Serialize)]
pub(super) struct Record<'a> {
    pub(super) seq: u64,
    pub(super) time: String,
    pub(super) schema: u32,
    #[serde(flatten)]
    pub(super) event: &'a Event,
    pub(super) prev: &'a str,
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
        // ring's SHA-256 (its assembly uses the CPU's SHA extensions): reading a month of
        // log is mostly hashing its lines (BENCHMARKS.md, the auditors' tools).
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut m = ring::hmac::Context::with_key(&key);
        for p in parts {
            m.update(p);
        }
        hex_lower(m.sign().as_ref())
    }
}

/// Lower-case hex, as links are written (the `hex` crate builds it a char at a time: a tenth
/// of a query's time over a month of log).
fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
    String::from_utf8(out).unwrap_or_default()
}

/// How one record is linked to the line before it.
pub(super) fn link(key: Option<&AuditKey>, line: &[u8]) -> String {
    match key {
        Some(k) => k.mac(&[line]),
        None => hex_lower(ring::digest::digest(&ring::digest::SHA256, line).as_ref()),
    }
}

pub(super) fn head_mac(key: &AuditKey, seq: u64, hash: &str) -> String {
    key.mac(&[
        b"keybroker-audit-head\0",
        seq.to_string().as_bytes(),
        b"\0",
        hash.as_bytes(),
    ])
}

pub(super) fn alg(key: Option<&AuditKey>) -> &'static str {
    if key.is_some() {
        "hmac-sha256"
    } else {
        "sha256"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_the_sha256_or_hmac_of_the_line_in_lower_hex() {
        use sha2::Digest;
        let line = br#"{"seq":0,"prev":"00"}"#;
        assert_eq!(link(None, line), hex::encode(Sha256::digest(line)));
        let key = AuditKey::from_bytes(&[7; 32]);
        use hmac::Mac;
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(&[7; 32]).unwrap();
        m.update(line);
        assert_eq!(
            link(Some(&key), line),
            hex::encode(m.finalize().into_bytes())
        );
    }
}
