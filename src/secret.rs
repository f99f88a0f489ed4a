//! Secret values in memory.
//!
//! Every byte that came from a provider lives in a [`SecretBytes`]: zeroized when dropped,
//! redacted in `Debug`, never `Display`. Nothing in this module writes, logs or serializes a
//! value; the only way to the bytes is [`SecretBytes::expose`], which makes each use greppable.

use std::fmt;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes of a secret. Zeroized on drop; `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw bytes. Call sites are the only places a value leaves this type.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, non-reversible fingerprint used to tell versions apart (never the value).
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.expose());
        hex::encode(&digest[..8])
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.len())
    }
}

/// A parsed JSON document that holds secrets: its strings are zeroized when it is dropped.
pub struct SecretJson(pub serde_json::Value);

impl SecretJson {
    /// The document as JSON text.
    pub fn to_bytes(&self) -> SecretBytes {
        json_bytes(&self.0)
    }
}

/// A JSON value (or part of a [`SecretJson`]) as JSON text in a [`SecretBytes`]. Sized before
/// writing, so no reallocation leaves a partial copy behind.
pub fn json_bytes(v: &serde_json::Value) -> SecretBytes {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Serializing a `Value` into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut n, v);
    let mut out = Vec::with_capacity(n.0);
    let _ = serde_json::to_writer(&mut out, v);
    SecretBytes::new(out)
}

impl Drop for SecretJson {
    fn drop(&mut self) {
        use serde_json::Value;
        use zeroize::Zeroize;
        fn wipe(v: &mut Value) {
            match v {
                Value::String(s) => s.zeroize(),
                Value::Array(a) => a.iter_mut().for_each(wipe),
                Value::Object(m) => m.values_mut().for_each(wipe),
                _ => {}
            }
        }
        wipe(&mut self.0);
    }
}

impl fmt::Debug for SecretJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretJson(<redacted>)")
    }
}

/// A lease attached to a fetched secret (Vault dynamic secrets, PKI certificates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub duration: Duration,
    pub renewable: bool,
}

/// The stated end of a value's life, and what it means for refreshing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A value issued for this caller (a Vault PKI certificate): the source will never show a
    /// newer one by itself, so it is reissued at 90% of its lifetime.
    Issued(SystemTime),
    /// A stored object's expiry attribute (Key Vault `attributes.exp`, a certificate's
    /// notAfter): the source may get a new version at any moment, so the object is polled
    /// like any other; the expiry can only make it due sooner.
    Stored(SystemTime),
}

/// One object as a provider returned it.
#[derive(Clone, Debug)]
pub struct SecretObject {
    pub value: SecretBytes,
    /// Provider version (Key Vault version id, KV v2 version, or a content fingerprint).
    pub version: String,
    pub content_type: Option<String>,
    /// When the value ends, when the provider knows it.
    pub expiry: Option<Expiry>,
    pub lease: Option<Lease>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretBytes::new(b"hunter2-very-secret".to_vec());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("19 bytes"));
        let obj = SecretObject {
            value: s,
            version: "v1".into(),
            content_type: None,
            expiry: None,
            lease: None,
        };
        assert!(!format!("{obj:?}").contains("hunter2"));
    }

    #[test]
    fn secret_json_serializes_exactly_and_hides_itself() {
        let j = SecretJson(serde_json::json!({"password": "hunter2-json", "n": [1, "x"]}));
        let bytes = j.to_bytes();
        assert_eq!(bytes.len(), bytes.expose().len());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(bytes.expose()).unwrap(),
            j.0
        );
        assert!(!format!("{j:?}").contains("hunter2"));
    }

    #[test]
    fn fingerprint_differs_by_content_and_hides_it() {
        let a = SecretBytes::new(b"a".to_vec());
        let b = SecretBytes::new(b"b".to_vec());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
    }
}
