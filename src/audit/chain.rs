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
        use hmac::Mac;
        // HMAC takes keys of any length.
        let mut m = hmac::Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        for p in parts {
            m.update(p);
        }
        hex::encode(m.finalize().into_bytes())
    }
}

/// How one record is linked to the line before it.
pub(super) fn link(key: Option<&AuditKey>, line: &[u8]) -> String {
    match key {
        Some(k) => k.mac(&[line]),
        None => hex::encode(Sha256::digest(line)),
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
