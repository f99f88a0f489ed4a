//! Key Vault objects into the PEM files pods expect: a certificate's DER (`cer`) as a
//! CERTIFICATE block, a key's public JWK as a SubjectPublicKeyInfo PUBLIC KEY block. The DER
//! written here is the small fixed structure of RFC 5280 / RFC 5480 / RFC 8017; no ASN.1 crate
//! is needed for it.

use base64::Engine;

/// A PEM block of `label` around `der`, lines of 64 characters.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER from big-endian unsigned bytes (leading zeros dropped, a zero added when the
/// top bit is set).
fn uint(bytes: &[u8]) -> Vec<u8> {
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let mut v = bytes[skip.min(bytes.len().saturating_sub(1))..].to_vec();
    if v.is_empty() {
        v.push(0);
    }
    if v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(bytes);
    tlv(0x03, &body)
}

const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const DER_NULL: &[u8] = &[0x05, 0x00];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_SECP256K1: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];

/// An RSA public key (modulus, exponent) as a PEM PUBLIC KEY (SubjectPublicKeyInfo).
pub fn rsa_public_key(n: &[u8], e: &[u8]) -> String {
    let key = seq(&[&uint(n), &uint(e)]);
    let spki = seq(&[&seq(&[OID_RSA_ENCRYPTION, DER_NULL]), &bit_string(&key)]);
    pem("PUBLIC KEY", &spki)
}

/// An EC public key on a named curve (`P-256`, `P-384`, `P-521`, `P-256K`) as a PEM PUBLIC KEY.
pub fn ec_public_key(curve: &str, x: &[u8], y: &[u8]) -> Result<String, String> {
    let (oid, size) = match curve {
        "P-256" => (OID_P256, 32),
        "P-384" => (OID_P384, 48),
        "P-521" => (OID_P521, 66),
        "P-256K" => (OID_SECP256K1, 32),
        other => return Err(format!("curve {other:?} is not supported")),
    };
    if x.len() > size || y.len() > size {
        return Err(format!("coordinates longer than curve {curve} allows"));
    }
    // Uncompressed point: 04 || X || Y, each left-padded to the field size.
    let mut point = vec![4];
    point.extend(std::iter::repeat_n(0, size - x.len()));
    point.extend_from_slice(x);
    point.extend(std::iter::repeat_n(0, size - y.len()));
    point.extend_from_slice(y);
    let spki = seq(&[&seq(&[OID_EC_PUBLIC_KEY, oid]), &bit_string(&point)]);
    Ok(pem("PUBLIC KEY", &spki))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpem(p: &str) -> Vec<u8> {
        let b64: String = p.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    #[test]
    fn rsa_spki_matches_a_known_encoding() {
        // A toy key: n = 0xC5 (top bit set: a leading zero is added), e = 65537.
        let der = unpem(&rsa_public_key(&[0x00, 0xc5], &[0x01, 0x00, 0x01]));
        let want = [
            0x30, 0x1d, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
            0x01, 0x05, 0x00, 0x03, 0x0c, 0x00, 0x30, 0x09, 0x02, 0x02, 0x00, 0xc5, 0x02, 0x03,
            0x01, 0x00, 0x01,
        ];
        assert_eq!(der, want);
    }

    #[test]
    fn long_lengths_use_the_long_form() {
        let n = vec![0x80; 256];
        let der = unpem(&rsa_public_key(&n, &[3]));
        // SEQUENCE with a two-byte length.
        assert_eq!(&der[..2], &[0x30, 0x82]);
        assert_eq!(
            usize::from(der[2]) << 8 | usize::from(der[3]),
            der.len() - 4
        );
    }

    #[test]
    fn ec_points_are_padded_and_curves_checked() {
        let der = unpem(&ec_public_key("P-256", &[1; 31], &[2; 32]).unwrap());
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4);
        assert_eq!(point[1], 0, "x left-padded to 32 bytes");
        assert!(ec_public_key("P-999", &[1], &[2]).is_err());
        assert!(ec_public_key("P-256", &[1; 33], &[2; 32]).is_err());
    }
}
