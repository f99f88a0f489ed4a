//! What a pod asks for, parsed once from a NodePublishVolume's `volume_context` and `secrets`.
//!
//! Two kinds of keys arrive there:
//! - kubelet's (`csi.storage.k8s.io/pod.*`, `serviceAccount.*`, `ephemeral`): the attested pod
//!   info and the service-account tokens (read from `secrets` first, then `volume_context`);
//! - the pod author's: the provider parameters, in the Secrets Store CSI providers' names so
//!   existing SecretProviderClass users can move (Azure: `keyvaultName, tenantID/tenantId,
//!   clientID, useVMManagedIdentity, userAssignedIdentityID, cloudName, objects`; Vault:
//!   `roleName, vaultAddress, vaultNamespace, vaultKubernetesMountPath/vaultAuthMountPath,
//!   audience, objects`), plus keybroker's own `provider`, `volumeType` and the `local` objects.
//!
//! Everything the pod author wrote is a *request*: [`super::bindings`] decides what is granted.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::token::{SaToken, parse_tokens};

mod objects;

pub use super::pod::PodInfo;

use crate::config::parse_mode;
use crate::untrusted;
use crate::volume::VolumeKind;
use crate::volume::content::{
    Encoding, FileName, FileSource, FileSpec, Limits, Template, VolumeContent,
};
pub use objects::MAX_VERSION_HISTORY;
use objects::{content_of, valid_vault_name};

pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const POD_SA: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
pub const SA_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// Default mode of files in node volumes (readable by the pod's non-root users).
pub const NODE_DEFAULT_MODE: u32 = 0o444;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Azure,
    Vault,
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Local => "local",
            ProviderKind::Azure => "azure",
            ProviderKind::Vault => "vault",
        })
    }
}

/// The identity a volume asks to act as (checked against the bindings, never trusted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityRequest {
    // Azure
    pub keyvault_name: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub use_vm_managed_identity: bool,
    pub user_assigned_identity_id: Option<String>,
    pub cloud_name: Option<String>,
    // Vault
    pub role_name: Option<String>,
    pub vault_address: Option<String>,
    pub vault_namespace: Option<String>,
    pub auth_mount: Option<String>,
    pub audience: Option<String>,
}

/// A parsed NodePublishVolume request.
#[derive(Debug)]
pub struct VolumeRequest {
    pub pod: PodInfo,
    pub provider: ProviderKind,
    pub kind: VolumeKind,
    pub identity: IdentityRequest,
    pub content: VolumeContent,
    pub tokens: Vec<SaToken>,
    /// The pod author's and kubelet's attributes, without tokens (kept for restarts).
    pub attributes: BTreeMap<String, String>,
    /// Fingerprint of the pod author's attributes (not tokens), to tell a republish of the same
    /// volume from a different request at the same target.
    pub digest: String,
    /// `credentialScope: volume`: this volume gets its own dynamic credentials instead of
    /// sharing the identity's (the default, so an init container and its app see the same).
    pub own_values: bool,
    /// `onChange`: signals (process name, signal number) for the pod's own processes after a
    /// rotation of this volume.
    pub on_change: Vec<(String, i32)>,
    /// `api: "true"`: serve the broker API on a socket inside the volume, to the pod's own
    /// processes (tmpfs volumes only).
    pub api: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNodeAction {
    signal: RawNodeSignal,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSignal {
    process: String,
    #[serde(default)]
    signal: Option<String>,
}

/// Node volumes' `onChange`: signals only (an HTTP URL would be the node's localhost), at most 4.
fn parse_on_change(text: &str) -> Result<Vec<(String, i32)>, RequestError> {
    let raw: Vec<RawNodeAction> = untrusted::from_yaml(text, "onChange").map_err(err)?;
    if raw.len() > 4 {
        return Err(err("onChange: at most 4 actions"));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let p = a.signal.process;
            if p.is_empty() || p.len() > 15 || p.chars().any(|c| c.is_control() || c == '/') {
                return Err(err(format!(
                    "onChange[{i}].signal.process: must be a process name as ps shows it (at most 15 characters)"
                )));
            }
            let sig = match a.signal.signal.as_deref().unwrap_or("HUP").trim_start_matches("SIG") {
                "HUP" => libc::SIGHUP,
                "USR1" => libc::SIGUSR1,
                "USR2" => libc::SIGUSR2,
                _ => {
                    return Err(err(format!(
                        "onChange[{i}].signal.signal: must be HUP, USR1 or USR2"
                    )));
                }
            };
            Ok((p, sig))
        })
        .collect()
}

impl VolumeRequest {
    /// Provider object names requested, as bindings match them.
    pub fn object_names(&self) -> Vec<String> {
        self.content.objects().into_iter().map(|o| o.name).collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RequestError(pub String);

fn err(s: impl Into<String>) -> RequestError {
    RequestError(s.into())
}

fn attr<'a>(ctx: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| ctx.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn owned(ctx: &BTreeMap<String, String>, keys: &[&str]) -> Option<String> {
    attr(ctx, keys).map(str::to_owned)
}

/// The attributes that describe the request (everything but tokens), for the state file and
/// the republish digest.
pub fn request_attributes(ctx: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    ctx.iter()
        .filter(|(k, _)| k.as_str() != SA_TOKENS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses a publish request's `volume_context` (and the tokens from `secrets`).
pub fn parse(
    ctx: &BTreeMap<String, String>,
    secrets: &keybroker_csi::Secrets,
    default_kind: VolumeKind,
    limits: Limits,
) -> Result<VolumeRequest, RequestError> {
    parse_with_mode(ctx, secrets, default_kind, limits, NODE_DEFAULT_MODE)
}

/// [`parse`], with the mode of files that set no `filePermission` (the Secrets Store driver
/// sends its own default with every Mount).
pub fn parse_with_mode(
    ctx: &BTreeMap<String, String>,
    secrets: &keybroker_csi::Secrets,
    default_kind: VolumeKind,
    limits: Limits,
    default_mode: u32,
) -> Result<VolumeRequest, RequestError> {
    let pod = pod_of(ctx)?;
    if attr(ctx, &[EPHEMERAL]).is_some_and(|e| e != "true") {
        return Err(err(
            "only ephemeral inline volumes are supported (csi.storage.k8s.io/ephemeral is not true)",
        ));
    }
    let provider = provider_of(ctx)?;
    let kind = match attr(ctx, &["volumeType"]) {
        None => default_kind,
        Some("fuse") => VolumeKind::Fuse,
        Some("tmpfs") => VolumeKind::Tmpfs,
        Some(_) => {
            return Err(err("volumeType is not known: use fuse or tmpfs"));
        }
    };
    let identity = identity_of(ctx, provider)?;
    let content = content_of(
        ctx,
        provider,
        identity.keyvault_name.as_deref(),
        default_mode,
        limits,
    )?;
    // kubelet puts tokens in `secrets` when serviceAccountTokenInSecrets is on; read that first.
    let tokens = match secrets.get(SA_TOKENS).or_else(|| attr(ctx, &[SA_TOKENS])) {
        None => Vec::new(),
        Some(json) => parse_tokens(json).map_err(err)?,
    };
    let own_values = match attr(ctx, &["credentialScope"]) {
        None | Some("identity") => false,
        Some("volume") => true,
        Some(_) => {
            return Err(err(
                "credentialScope is not known: use identity (shared, the default) or volume",
            ));
        }
    };
    let on_change = match attr(ctx, &["onChange"]) {
        None => Vec::new(),
        Some(t) => parse_on_change(t)?,
    };
    let api = match attr(ctx, &["api"]) {
        None | Some("false") => false,
        Some("true") if kind == VolumeKind::Tmpfs => true,
        Some("true") => {
            return Err(err(
                "api: \"true\" needs volumeType: tmpfs (the broker API's socket lives in the volume)",
            ));
        }
        Some(_) => return Err(err("api must be \"true\" or \"false\"")),
    };
    let attributes = request_attributes(ctx);
    let digest = digest_of(&attributes);
    Ok(VolumeRequest {
        pod,
        provider,
        kind,
        identity,
        content,
        tokens,
        attributes,
        digest,
        own_values,
        on_change,
        api,
    })
}

/// The pod kubelet publishes for (podInfoOnMount).
fn pod_of(ctx: &BTreeMap<String, String>) -> Result<PodInfo, RequestError> {
    let need = |k: &str| {
        attr(ctx, &[k]).map(str::to_owned).ok_or_else(|| {
            err(format!(
                "volume_context has no {k}: set podInfoOnMount: true on the CSIDriver (keybroker serves ephemeral inline volumes only)"
            ))
        })
    };
    Ok(PodInfo {
        namespace: need(POD_NAMESPACE)?,
        name: need(POD_NAME)?,
        uid: need(POD_UID)?,
        service_account: need(POD_SA)?,
    })
}

/// The provider the volume names (or implies by its Secrets Store attributes).
fn provider_of(ctx: &BTreeMap<String, String>) -> Result<ProviderKind, RequestError> {
    Ok(match attr(ctx, &["provider"]) {
        Some("local") => ProviderKind::Local,
        Some("azure") => ProviderKind::Azure,
        Some("vault") => ProviderKind::Vault,
        Some(_) => {
            return Err(err("provider is not known: use local, azure or vault"));
        }
        None if attr(ctx, &["keyvaultName"]).is_some() => ProviderKind::Azure,
        None if attr(ctx, &["roleName", "vaultAddress"]).is_some() => ProviderKind::Vault,
        None => {
            return Err(err(
                "volume_context names no provider: set provider to local, azure or vault",
            ));
        }
    })
}

/// The identity the volume asks for (checked against the bindings later).
fn identity_of(
    ctx: &BTreeMap<String, String>,
    provider: ProviderKind,
) -> Result<IdentityRequest, RequestError> {
    let identity = IdentityRequest {
        keyvault_name: owned(ctx, &["keyvaultName"]),
        tenant_id: owned(ctx, &["tenantID", "tenantId"]),
        client_id: owned(ctx, &["clientID"]),
        use_vm_managed_identity: attr(ctx, &["useVMManagedIdentity"])
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        user_assigned_identity_id: owned(ctx, &["userAssignedIdentityID"]),
        cloud_name: owned(ctx, &["cloudName"]),
        role_name: owned(ctx, &["roleName"]),
        vault_address: owned(ctx, &["vaultAddress"]),
        vault_namespace: owned(ctx, &["vaultNamespace"]),
        auth_mount: owned(ctx, &["vaultAuthMountPath", "vaultKubernetesMountPath"]),
        audience: owned(ctx, &["audience"]),
    };
    if provider == ProviderKind::Azure {
        match identity.keyvault_name.as_deref() {
            None => return Err(err("keyvaultName is required for the azure provider")),
            Some(v) if !valid_vault_name(v) => {
                return Err(err(
                    "keyvaultName is not a Key Vault name (3-24 letters, digits and dashes, starting with a letter)",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(identity)
}

/// A digest of the request's attributes: a republish must ask for the same volume.
fn digest_of(attributes: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in attributes {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BTreeMap<String, String> {
        [
            (POD_NAMESPACE, "team-a"),
            (POD_NAME, "web-1"),
            (POD_UID, "uid-1"),
            (POD_SA, "api"),
            (EPHEMERAL, "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn parse_ctx(ctx: &BTreeMap<String, String>) -> Result<VolumeRequest, RequestError> {
        parse(
            ctx,
            &Default::default(),
            VolumeKind::Fuse,
            Limits::default(),
        )
    }

    #[test]
    fn api_needs_a_tmpfs_volume() {
        let mut ctx = base();
        ctx.insert("provider".into(), "local".into());
        ctx.insert("objects".into(), "- objectName: a\n  object: db\n".into());
        assert!(!parse_ctx(&ctx).unwrap().api);
        ctx.insert("api".into(), "true".into());
        let e = parse_ctx(&ctx).unwrap_err();
        assert!(e.0.contains("volumeType: tmpfs"), "{}", e.0);
        ctx.insert("volumeType".into(), "tmpfs".into());
        assert!(parse_ctx(&ctx).unwrap().api);
        ctx.insert("api".into(), "yes".into());
        assert!(parse_ctx(&ctx).unwrap_err().0.contains("api must be"));
    }

    #[test]
    fn local_objects_parse_into_files() {
        let mut ctx = base();
        ctx.insert("provider".into(), "local".into());
        ctx.insert("volumeType".into(), "tmpfs".into());
        ctx.insert(
            "objects".into(),
            "- objectName: db-password\n  object: db\n  key: password\n  filePermission: \"0440\"\n- objectName: url\n  object: db\n  template: \"pg://{{username}}\"\n".into(),
        );
        let r = parse_ctx(&ctx).unwrap();
        assert_eq!(r.provider, ProviderKind::Local);
        assert_eq!(r.kind, VolumeKind::Tmpfs);
        assert_eq!(r.pod.namespace, "team-a");
        assert_eq!(r.content.files[0].mode, 0o440);
        assert_eq!(r.content.files[1].mode, NODE_DEFAULT_MODE);
        assert_eq!(r.object_names(), ["db"]);
    }

    #[test]
    fn secrets_store_azure_and_vault_parameters_are_understood() {
        let mut ctx = base();
        ctx.insert("keyvaultName".into(), "kv1".into());
        ctx.insert("tenantId".into(), "t1".into());
        ctx.insert("clientID".into(), "c1".into());
        ctx.insert(
            "objects".into(),
            "array:\n  - |\n    objectName: db-pass\n    objectType: secret\n    objectAlias: password\n    objectVersion: 0123456789abcdef0123456789abcdef\n  - |\n    objectName: tls\n    objectType: cert\n    objectFormat: pem\n".into(),
        );
        let r = parse_ctx(&ctx).unwrap();
        assert_eq!(r.provider, ProviderKind::Azure);
        assert_eq!(r.identity.tenant_id.as_deref(), Some("t1"));
        assert_eq!(r.content.files[0].name.as_str(), "password");
        assert_eq!(r.content.files[0].object, "secret/db-pass");
        assert_eq!(
            r.content.files[0].version.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            r.content.files[0].params.as_deref(),
            Some("vault=kv1&format=pem")
        );
        // Key Vault's own rules, checked before anything is asked of it.
        for (objects, field) in [
            ("array:\n  - |\n    objectName: a/b\n", "objectName"),
            (
                "array:\n  - |\n    objectName: a\n    objectVersion: abc\n",
                "objectVersion",
            ),
            (
                "array:\n  - |\n    objectName: a\n    objectType: key\n    objectFormat: pfx\n",
                "objectFormat",
            ),
        ] {
            ctx.insert("objects".into(), objects.into());
            let e = parse_ctx(&ctx).unwrap_err().0;
            assert!(e.contains(field), "{e}");
        }
        // objectVersionHistory: a directory of numbered files, newest first.
        ctx.insert(
            "objects".into(),
            "array:\n  - |\n    objectName: db\n    objectVersionHistory: 3\n".into(),
        );
        let r = parse_ctx(&ctx).unwrap();
        let names: Vec<&str> = r.content.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["db/0", "db/1", "db/2"]);
        assert_eq!(r.object_names(), ["secret/db"]);
        for bad in ["0", "17", "x", "[1]"] {
            ctx.insert(
                "objects".into(),
                format!("array:\n  - |\n    objectName: db\n    objectVersionHistory: {bad}\n"),
            );
            let e = parse_ctx(&ctx).unwrap_err().0;
            assert!(e.contains("objectVersionHistory"), "{bad}: {e}");
        }
        ctx.insert("keyvaultName".into(), "kv_1".into());
        assert!(parse_ctx(&ctx).unwrap_err().0.contains("keyvaultName"));

        let mut ctx = base();
        ctx.insert("roleName".into(), "app".into());
        ctx.insert("vaultAddress".into(), "https://vault:8200".into());
        ctx.insert("vaultKubernetesMountPath".into(), "kubernetes".into());
        ctx.insert(
            "objects".into(),
            "- objectName: db-password\n  secretPath: secret/data/db\n  secretKey: password\n"
                .into(),
        );
        let r = parse_ctx(&ctx).unwrap();
        assert_eq!(r.provider, ProviderKind::Vault);
        assert_eq!(r.identity.auth_mount.as_deref(), Some("kubernetes"));
        assert_eq!(r.content.files[0].object, "secret/data/db");
    }

    #[test]
    fn hostile_or_missing_input_is_refused_with_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "local",
                "- objectName: ../../etc/passwd\n",
                "objects[0].objectName",
            ),
            ("local", "- objectName: /abs\n", "absolute"),
            (
                "local",
                "- objectName: a\n  filePermission: \"7777\"\n",
                "filePermission",
            ),
            ("local", "- objectName: a\n  bogus: 1\n", "unknown field"),
            ("local", "- objectName: a\n  encoding: rot13\n", "encoding"),
            ("nfs", "- objectName: a\n", "not known"),
        ];
        for (provider, objects, want) in cases {
            let mut ctx = base();
            ctx.insert("provider".into(), provider.to_string());
            ctx.insert("objects".into(), objects.to_string());
            let e = parse_ctx(&ctx).unwrap_err().0;
            assert!(e.contains(want), "{objects}: {e}");
        }
        let mut ctx = base();
        ctx.remove(POD_UID);
        ctx.insert("provider".into(), "local".into());
        ctx.insert("objects".into(), "- objectName: a\n".into());
        assert!(parse_ctx(&ctx).unwrap_err().0.contains("podInfoOnMount"));
        let many: String = (0..65).map(|i| format!("- objectName: f{i}\n")).collect();
        let mut ctx = base();
        ctx.insert("provider".into(), "local".into());
        ctx.insert("objects".into(), many);
        assert!(parse_ctx(&ctx).unwrap_err().0.contains("at most 64"));
    }

    #[test]
    fn tokens_come_from_secrets_first_and_do_not_change_the_digest() {
        let mut ctx = base();
        ctx.insert("provider".into(), "local".into());
        ctx.insert("objects".into(), "- objectName: a\n".into());
        let d1 = parse_ctx(&ctx).unwrap().digest;
        ctx.insert(
            SA_TOKENS.into(),
            r#"{"ctx":{"token":"a.b.c","expirationTimestamp":""}}"#.into(),
        );
        let r = parse_ctx(&ctx).unwrap();
        assert_eq!(r.digest, d1);
        assert_eq!(r.tokens[0].audience, "ctx");
        let secrets: keybroker_csi::Secrets = std::collections::HashMap::from([(
            SA_TOKENS.to_string(),
            r#"{"sec":{"token":"a.b.c","expirationTimestamp":""}}"#.to_string(),
        )])
        .into();
        let r = parse(&ctx, &secrets, VolumeKind::Fuse, Limits::default()).unwrap();
        assert_eq!(r.tokens[0].audience, "sec");
    }
}
