//! Public-key checkpoints: with `--audit-signing-key` (Ed25519) the writer signs a
//! `checkpoint` record every few seconds and before every seal, and the head anchor. A
//! checkpoint signs the sequence number and link of the record before it (which chain every
//! earlier record), the segment it is in and its time; `keybroker audit verify --public-key`
//! checks them with the public keys alone, so an auditor can verify a log without being able
//! to forge one (an HMAC key, `--audit-key`, can do both). Each signature names its key's id
//! (the first 16 hex digits of the SHA-256 of the raw public key): after a key rotation the
//! verifier is given every public key in use.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::*;

/// The node's Ed25519 signing key (PKCS#8, PEM or DER, as `openssl genpkey -algorithm
/// ed25519` writes it).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, <redacted>)", self.id)
    }
}

/// An Ed25519 public key (SubjectPublicKeyInfo, PEM or DER, as `openssl pkey -pubout` writes
/// it) a verifier accepts checkpoints from.
#[derive(Clone, Debug)]
pub struct PublicKey {
    raw: [u8; 32],
    id: String,
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A key's id: the first 16 hex digits of the SHA-256 of the raw public key.
pub fn key_id(raw_public: &[u8]) -> String {
    hex::encode(&Sha256::digest(raw_public)[..8])
}

/// DER from a PEM block labelled `label`, or the bytes as they are when they are not PEM.
fn der(bytes: &[u8], label: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use base64::Engine;
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(zeroize::Zeroizing::new(bytes.to_vec()));
    };
    let begin = format!("-----BEGIN {label}-----");
    let Some(start) = text.find(&begin) else {
        if text.contains("-----BEGIN") {
            return Err(format!("expected a PEM block \"{label}\""));
        }
        return Ok(zeroize::Zeroizing::new(bytes.to_vec()));
    };
    let body = &text[start + begin.len()..];
    let end = body
        .find("-----END")
        .ok_or_else(|| format!("the PEM block \"{label}\" has no end"))?;
    let b64: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
        body[..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map(zeroize::Zeroizing::new)
        .map_err(|e| format!("the PEM block is not base64: {e}"))
}

impl SigningKey {
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let bad = |error: String| AuditError::Key {
            path: path.to_owned(),
            error,
        };
        let raw = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        let der = der(&raw, "PRIVATE KEY").map_err(|e| {
            bad(format!(
                "{e} (make one with `openssl genpkey -algorithm ed25519 -out FILE`)"
            ))
        })?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|_| {
            bad("not an Ed25519 private key in PKCS#8 (make one with `openssl genpkey -algorithm ed25519 -out FILE`)".into())
        })?;
        let id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, id })
    }

    /// A key from a PKCS#8 document (tests).
    pub fn from_pkcs8(der: &[u8]) -> Option<Self> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).ok()?;
        let id = key_id(pair.public_key().as_ref());
        Some(Self { pair, id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half, for verifiers.
    pub fn public(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey {
            raw,
            id: self.id.clone(),
        }
    }

    pub(super) fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let bad = |error: String| AuditError::Key {
            path: path.to_owned(),
            error,
        };
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let der = der(&raw, "PUBLIC KEY").map_err(bad)?;
        Self::from_spki(&der).ok_or_else(|| {
            bad(
                "not an Ed25519 public key (make it with `openssl pkey -in KEY -pubout -out FILE`)"
                    .into(),
            )
        })
    }

    /// From a DER SubjectPublicKeyInfo of an Ed25519 key.
    pub fn from_spki(der: &[u8]) -> Option<Self> {
        let raw: [u8; 32] = der.strip_prefix(&SPKI_PREFIX)?.try_into().ok()?;
        Some(Self {
            raw,
            id: key_id(&raw),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn verifies(&self, message: &[u8], signature_hex: &str) -> bool {
        let Ok(sig) = hex::decode(signature_hex) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(message, &sig)
            .is_ok()
    }
}

/// What a checkpoint record signs: the record before it (`seq`, `link`), the segment it is
/// in (its first sequence number) and the checkpoint's own `time`.
pub(super) fn checkpoint_message(seq: u64, link: &str, segment: u64, time: &str) -> Vec<u8> {
    format!("keybroker-audit-checkpoint/1\0{seq}\0{link}\0{segment}\0{time}").into_bytes()
}

/// What a signed head anchor signs.
pub(super) fn head_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("keybroker-audit-head/1\0{seq}\0{hash}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        SigningKey::from_pkcs8(doc.as_ref()).unwrap()
    }

    #[test]
    fn openssl_keys_load_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let public = dir.path().join("pub.pem");
        let ok = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key)
            .status()
            .unwrap()
            .success()
            && std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&public)
                .status()
                .unwrap()
                .success();
        assert!(ok, "openssl");
        let s = SigningKey::load(&key).unwrap();
        let p = PublicKey::load(&public).unwrap();
        assert_eq!(s.id(), p.id());
        assert!(!format!("{s:?}").contains("BEGIN"));
        let sig = s.sign(b"m");
        assert!(p.verifies(b"m", &sig));
        assert!(!p.verifies(b"n", &sig));
        // The wrong kind of file is refused with the command that makes the right one.
        let e = SigningKey::load(&public).unwrap_err().to_string();
        assert!(e.contains("openssl genpkey"), "{e}");
        let e = PublicKey::load(&key).unwrap_err().to_string();
        assert!(e.contains("PUBLIC KEY"), "{e}");
        assert_eq!(test_key().public().id().len(), 16);
    }
}
