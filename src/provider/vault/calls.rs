//! What a volume asks of Vault, as Vault calls: paths checked, methods and arguments in a
//! canonical form, KV engines told apart.

use super::*;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Engine {
    KvV1,
    KvV2 { mount: String },
    Other,
}

/// What a volume asks of Vault for one object, parsed from [`ObjectRequest`].
#[derive(Debug, PartialEq)]
pub(super) struct Call {
    pub(super) path: String,
    pub(super) method: Method,
    /// JSON body for PUT/POST (`secretArgs`).
    pub(super) args: Option<Value>,
}

/// How a pod's `method` and `secretArgs` travel in an [`ObjectRequest`]: canonical JSON, so two
/// volumes asking the same thing share one cache entry.
pub fn encode_params(method: &str, args: Option<&Value>) -> Result<Option<String>, String> {
    let m = method.to_ascii_uppercase();
    if !matches!(m.as_str(), "GET" | "PUT" | "POST") {
        return Err("must be GET, PUT or POST".into());
    }
    match (m.as_str(), args) {
        ("GET", None) => Ok(None),
        ("GET", Some(_)) => Err("secretArgs need method PUT or POST".into()),
        (_, Some(a)) if !a.is_object() => Err("secretArgs must be a map".into()),
        (_, a) => {
            let v = serde_json::json!({"method": m, "args": a.cloned().unwrap_or(Value::Null)});
            Ok(Some(v.to_string()))
        }
    }
}

/// Checks a Vault path from a pod: relative, no `..`, no empty segments, no query or fragment,
/// printable ASCII.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 512 {
        return Err("must be a Vault path of 1 to 512 bytes".into());
    }
    if path.starts_with('/') || path.ends_with('/') {
        return Err("must not start or end with '/'".into());
    }
    if let Some(c) = path
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '%' | '\\'))
    {
        return Err(format!(
            "must not contain {}",
            if c.is_ascii_graphic() {
                format!("'{c}'")
            } else {
                "spaces or control characters".into()
            }
        ));
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("must not contain empty, '.' or '..' segments".into());
    }
    Ok(())
}

pub(super) fn parse_call(req: &ObjectRequest) -> Result<Call, ProviderError> {
    let invalid = |detail: String| ProviderError::Invalid {
        provider: KIND,
        object: req.name.clone(),
        detail,
    };
    check_path(&req.name).map_err(invalid)?;
    let (method, args) = match &req.params {
        None => (Method::GET, None),
        Some(p) => {
            let v: Value = serde_json::from_str(p).map_err(|_| invalid("bad parameters".into()))?;
            let m = match v.get("method").and_then(Value::as_str) {
                Some("PUT") => Method::PUT,
                Some("POST") => Method::POST,
                _ => Method::GET,
            };
            (m, v.get("args").filter(|a| !a.is_null()).cloned())
        }
    };
    Ok(Call {
        path: req.name.clone(),
        method,
        args,
    })
}
