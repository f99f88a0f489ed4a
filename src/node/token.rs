//! Service-account tokens as kubelet hands them over (`csi.storage.k8s.io/serviceAccount.tokens`:
//! `{"<audience>": {"token": "...", "expirationTimestamp": "RFC3339"}}`) and the cross-check of
//! their Kubernetes claims against the pod info kubelet sent with them.
//!
//! The signature is not checked here: the token's real validation is by the party it is for
//! (Entra ID, Vault). This check makes sure a volume cannot present another pod's token, and
//! refuses expired tokens before any provider sees them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::pod::PodInfo;

/// Longest token accepted (projected tokens are ~1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// One service-account token, for one audience.
#[derive(Clone)]
pub struct SaToken {
    pub audience: String,
    pub token: Zeroizing<String>,
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for SaToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaToken")
            .field("audience", &self.audience)
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

#[derive(Deserialize)]
struct RawToken {
    token: String,
    #[serde(rename = "expirationTimestamp")]
    expiration: Option<String>,
}

/// Parses kubelet's token map. Errors never contain token text.
pub fn parse_tokens(json: &str) -> Result<Vec<SaToken>, String> {
    let raw: BTreeMap<String, RawToken> = serde_json::from_str(json)
        .map_err(|_| "serviceAccount.tokens is not kubelet's JSON map of audience to {token, expirationTimestamp}".to_string())?;
    let mut out = Vec::with_capacity(raw.len());
    for (audience, t) in raw {
        let token = Zeroizing::new(t.token);
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!(
                "the token for audience {audience:?} is larger than {MAX_TOKEN_BYTES} bytes"
            ));
        }
        let expires = match t.expiration.as_deref() {
            None | Some("") => None,
            Some(ts) => Some(humantime::parse_rfc3339_weak(ts).map_err(|_| {
                format!(
                    "expirationTimestamp of the token for audience {audience:?} is not RFC 3339"
                )
            })?),
        };
        out.push(SaToken {
            audience,
            token,
            expires,
        });
    }
    Ok(out)
}

/// The claims keybroker checks.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct Claims {
    #[serde(default)]
    pub sub: String,
    pub exp: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<KubeClaims>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct KubeClaims {
    #[serde(default)]
    pub namespace: String,
    pub pod: Option<NameUid>,
    pub serviceaccount: Option<NameUid>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct NameUid {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// Decodes the payload of a JWT (no signature check; see the module docs).
pub fn claims(token: &str) -> Result<Claims, String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the service-account token is not a JWT".into());
    };
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| "the service-account token's payload is not base64url".to_string())?,
    );
    serde_json::from_slice(&bytes)
        .map_err(|_| "the service-account token's payload is not a JSON claims set".to_string())
}

/// Checks that `token` was issued for `pod` and has not expired at `now`.
pub fn check(token: &SaToken, pod: &PodInfo, now: SystemTime) -> Result<(), String> {
    let aud = &token.audience;
    let c = claims(&token.token)?;
    let exp = c
        .exp
        // A claim past what the clock can hold is treated as no claim (not a panic).
        .and_then(|e| UNIX_EPOCH.checked_add(Duration::from_secs(e)))
        .or(token.expires);
    if exp.is_some_and(|e| e <= now) {
        return Err(format!(
            "the service-account token for audience {aud:?} has expired"
        ));
    }
    let k = c
        .kubernetes
        .ok_or_else(|| format!("the token for audience {aud:?} has no kubernetes.io claims (not a bound service-account token)"))?;
    let want_sub = format!(
        "system:serviceaccount:{}:{}",
        pod.namespace, pod.service_account
    );
    let mismatch = |what: &str, got: &str, want: &str| {
        format!(
            "the token for audience {aud:?} names {what} {got:?} but kubelet says the pod's {what} is {want:?}"
        )
    };
    if k.namespace != pod.namespace {
        return Err(mismatch("namespace", &k.namespace, &pod.namespace));
    }
    let sa = k.serviceaccount.unwrap_or_default();
    if sa.name != pod.service_account {
        return Err(mismatch("service account", &sa.name, &pod.service_account));
    }
    if !c.sub.is_empty() && c.sub != want_sub {
        return Err(mismatch("subject", &c.sub, &want_sub));
    }
    let p = k
        .pod
        .ok_or_else(|| format!("the token for audience {aud:?} is not bound to a pod"))?;
    if p.uid != pod.uid {
        return Err(mismatch("pod uid", &p.uid, &pod.uid));
    }
    if !pod.name.is_empty() && p.name != pod.name {
        return Err(mismatch("pod name", &p.name, &pod.name));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unsigned JWT with Kubernetes claims, as the tests' stand-in for kubelet's tokens.
    pub fn jwt(ns: &str, sa: &str, pod: &str, uid: &str, exp: u64) -> String {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let header = b64(&serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let payload = b64(&serde_json::json!({
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "exp": exp,
            "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": uid}, "serviceaccount": {"name": sa, "uid": "sa-uid"}}
        }));
        format!("{header}.{payload}.c2ln")
    }

    #[test]
    fn an_exp_past_what_the_clock_holds_is_no_panic() {
        let p = pod();
        for exp in [u64::MAX, 10_000_000_001_263_207_793, i64::MAX as u64] {
            let t = tok(jwt(&p.namespace, &p.service_account, &p.name, &p.uid, exp));
            let _ = check(&t, &p, SystemTime::now());
        }
    }

    fn pod() -> PodInfo {
        PodInfo {
            namespace: "team-a".into(),
            name: "web-1".into(),
            uid: "11111111-2222-3333-4444-555555555555".into(),
            service_account: "api".into(),
        }
    }

    fn tok(t: String) -> SaToken {
        SaToken {
            audience: "vault".into(),
            token: Zeroizing::new(t),
            expires: None,
        }
    }

    #[test]
    fn matching_token_passes_and_mismatches_are_named() {
        let now = SystemTime::now();
        let later = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
        let uid = "11111111-2222-3333-4444-555555555555";
        assert_eq!(
            check(&tok(jwt("team-a", "api", "web-1", uid, later)), &pod(), now),
            Ok(())
        );
        let cases = [
            (jwt("team-b", "api", "web-1", uid, later), "namespace"),
            (
                jwt("team-a", "admin", "web-1", uid, later),
                "service account",
            ),
            (jwt("team-a", "api", "web-1", "other-uid", later), "pod uid"),
            (jwt("team-a", "api", "web-1", uid, 1000), "expired"),
            ("not-a-jwt".to_string(), "not a JWT"),
        ];
        for (t, want) in cases {
            let err = check(&tok(t.clone()), &pod(), now).unwrap_err();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains(&t), "error contains the token");
        }
    }

    #[test]
    fn kubelet_token_map_parses_and_hides_tokens() {
        let json = r#"{"vault":{"token":"aaa.bbb.ccc","expirationTimestamp":"2026-11-23T16:00:00Z"},"api://AzureADTokenExchange":{"token":"x.y.z","expirationTimestamp":""}}"#;
        let t = parse_tokens(json).unwrap();
        assert_eq!(t.len(), 2);
        assert!(
            t.iter()
                .any(|t| t.audience == "vault" && t.expires.is_some())
        );
        assert!(!format!("{t:?}").contains("aaa.bbb"));
        assert!(parse_tokens("{\"a\": 1}").is_err());
        assert!(
            !parse_tokens("{\"a\": {\"tokn\": \"SECRET\"}}")
                .unwrap_err()
                .contains("SECRET")
        );
    }
}
