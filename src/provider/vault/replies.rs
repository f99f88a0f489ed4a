//! What Vault answers, parsed: login and lease replies, and read replies as secret objects.

use super::*;

#[derive(Deserialize)]
pub(super) struct AuthReply {
    pub(super) auth: Option<Auth>,
}

#[derive(Deserialize)]
pub(super) struct Auth {
    pub(super) client_token: Zeroizing<String>,
    #[serde(default)]
    pub(super) lease_duration: u64,
    #[serde(default)]
    pub(super) renewable: bool,
}

/// The reply to `sys/leases/renew` (no secret in it).
#[derive(Deserialize)]
pub(super) struct LeaseReply {
    pub(super) lease_duration: u64,
    #[serde(default)]
    pub(super) renewable: bool,
}

/// What a Vault read reply means: the value (KV v2's `data.data`, otherwise `data`), its
/// version, its lease (capped at what is left of the token) and a PKI expiry. Pure, so the
/// fuzzer drives it with arbitrary replies: a reply never panics the node, whatever its shape.
pub(super) fn object_from_reply(
    engine: &Engine,
    body: &[u8],
    name: &str,
    token_left: Option<Duration>,
) -> Result<SecretObject, ProviderError> {
    let invalid = |detail: String| ProviderError::Invalid {
        provider: KIND,
        object: name.to_owned(),
        detail,
    };
    let doc = SecretJson(
        serde_json::from_slice::<Value>(body)
            .map_err(|_| invalid("Vault's reply is not JSON".into()))?,
    );
    let data = doc.0.get("data").filter(|d| d.is_object());
    let (value, version) = match (&engine, data) {
        (Engine::KvV2 { .. }, Some(d)) => {
            let inner =
                d.get("data")
                    .filter(|v| v.is_object())
                    .ok_or_else(|| ProviderError::NotFound {
                        provider: KIND,
                        object: name.to_owned(),
                    })?;
            let version = d
                .get("metadata")
                .and_then(|m| m.get("version"))
                .and_then(Value::as_u64)
                .map(|v| v.to_string());
            let value = json_bytes(inner);
            let version = version.unwrap_or_else(|| value.fingerprint());
            (value, version)
        }
        (_, Some(d)) => {
            let value = json_bytes(d);
            let version = value.fingerprint();
            (value, version)
        }
        (_, None) => {
            return Err(ProviderError::NotFound {
                provider: KIND,
                object: name.to_owned(),
            });
        }
    };
    // Read from the top-level fields only: the document also holds the secret data, which
    // must not be copied out of the wiped document.
    let lease = match doc.0.get("lease_id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && *engine == Engine::Other => Some(Lease {
            id: id.to_owned(),
            duration: cap(
                Duration::from_secs(
                    doc.0
                        .get("lease_duration")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                ),
                token_left,
            ),
            renewable: doc
                .0
                .get("renewable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }),
        _ => None,
    };
    // A PKI certificate was issued for this volume and says when it ends: that is its
    // rotation deadline (nothing newer appears at the source by itself).
    let expiry = data
        .and_then(|d| d.get("expiration"))
        .and_then(Value::as_u64)
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .map(Expiry::Issued);
    let version = match (&lease, data.and_then(|d| d.get("serial_number"))) {
        (_, Some(Value::String(serial))) => serial.clone(),
        (Some(l), _) => format!("lease-{}", short_hash(&l.id)),
        (None, _) => version,
    };
    Ok(SecretObject {
        value,
        version,
        content_type: Some("application/json".into()),
        expiry,
        lease,
    })
}

/// Entry points for the fuzz targets (`fuzz/`): the parsers of Vault replies, whatever the
/// reply's shape.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Interprets `body` as a read reply of a KV v1, KV v2 or other engine (by `engine % 3`).
    pub fn read_reply(engine: u8, body: &[u8]) {
        let engine = match engine % 3 {
            0 => Engine::KvV1,
            1 => Engine::KvV2 {
                mount: "secret".into(),
            },
            _ => Engine::Other,
        };
        let _ = object_from_reply(&engine, body, "fuzz/object", Some(Duration::from_secs(60)));
        let _ = serde_json::from_slice::<AuthReply>(body);
        let _ = serde_json::from_slice::<LeaseReply>(body);
        let _ = client::error_text(&SecretBytes::new(body.to_vec()), &[b"hide"]);
    }
}
