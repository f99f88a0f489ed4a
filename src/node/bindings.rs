//! Identity bindings: which pods may act as which identity and read which objects. Written by
//! the platform team (a YAML file, usually a ConfigMap), hot-reloaded. Anything no binding
//! grants is denied.
//!
//! ```yaml
//! bindings:
//!   - name: team-a-dev                 # unique; named in audit records and denials
//!     namespace: team-a                # exact namespace (no wildcards)
//!     serviceAccounts: [api, worker]   # exact service account names (no wildcards, no labels)
//!     identity:
//!       local: {path: /etc/keybroker/dev-secrets}
//!       # azure: {tenantID: ..., clientID: ..., keyvaults: [kv1]}   # workload identity
//!       # azure: {tenantID: ..., managedIdentity: {clientID: ...}} # the node's managed identity
//!       # vault: {address: https://vault:8200, authMount: jwt, role: team-a, namespace: ns1,
//!       #         caFile: /etc/keybroker/vault-ca.pem, tlsServerName: vault.internal,
//!       #         audience: vault}
//!     objects: ["db", "api-*"]         # exact object names, or prefixes ending in '*'
//!     readers: pod                     # optional: only the volume's own pod may open its
//!                                      # files (default any: every open audited)
//!     executables: [/app/server]       # optional, with readers: pod: only these programs
//! ```
//!
//! A volume's own parameters (`clientID`, `roleName`, `keyvaultName`, ...) are a request: they
//! must agree with the binding, they never widen it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::request::{IdentityRequest, PodInfo, ProviderKind, VolumeRequest};
pub use crate::access::Readers;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    bindings: Vec<RawBinding>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBinding {
    name: String,
    namespace: String,
    service_accounts: Vec<String>,
    identity: RawIdentity,
    objects: Vec<String>,
    readers: Option<String>,
    executables: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIdentity {
    local: Option<LocalIdentity>,
    azure: Option<AzureIdentity>,
    vault: Option<VaultIdentity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalIdentity {
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AzureIdentity {
    /// The Entra tenant of the identity and of the vaults it reads.
    #[serde(rename = "tenantID")]
    pub tenant_id: String,
    /// The application (client) ID the pod's service-account token is exchanged for, through a
    /// federated credential registered on it (workload identity federation).
    #[serde(rename = "clientID", default)]
    pub client_id: String,
    /// Instead of federation: the node's user-assigned managed identity with this client ID,
    /// from IMDS or the App Service identity endpoint. Only pods this binding selects may use it.
    pub managed_identity: Option<ManagedIdentityGrant>,
    /// Key Vault names this identity may be used against (empty: any).
    #[serde(default)]
    pub keyvaults: Vec<String>,
    /// Entra authority host (default `https://login.microsoftonline.com`; sovereign clouds
    /// have their own).
    pub authority_host: Option<String>,
    /// DNS suffix of vault hosts (default `vault.azure.net`): a vault named `kv1` is
    /// `https://kv1.<suffix>`. A suffix other than a public cloud's also relaxes the SDK's
    /// check that a challenge's resource matches the vault host, for these vaults only.
    #[serde(rename = "keyvaultDNSSuffix")]
    pub keyvault_dns_suffix: Option<String>,
    /// PEM CA bundle for Entra and Key Vault (instead of the public roots).
    pub ca_file: Option<PathBuf>,
    /// Audience of the service-account token exchanged (default `api://AzureADTokenExchange`).
    pub audience: Option<String>,
}

/// A user-assigned managed identity a binding grants.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedIdentityGrant {
    #[serde(rename = "clientID")]
    pub client_id: String,
}

/// The public cloud's Entra authority.
pub const AZURE_PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The public cloud's Key Vault DNS suffix.
pub const AZURE_PUBLIC_KEYVAULT_SUFFIX: &str = "vault.azure.net";
/// Vault DNS suffixes of the public and sovereign clouds (the SDK's challenge check holds).
pub const AZURE_CLOUD_KEYVAULT_SUFFIXES: [&str; 3] = [
    "vault.azure.net",
    "vault.azure.cn",
    "vault.usgovcloudapi.net",
];

impl AzureIdentity {
    pub fn audience(&self) -> &str {
        self.audience
            .as_deref()
            .unwrap_or("api://AzureADTokenExchange")
    }

    pub fn authority_host(&self) -> &str {
        self.authority_host
            .as_deref()
            .unwrap_or(AZURE_PUBLIC_AUTHORITY)
            .trim_end_matches('/')
    }

    pub fn keyvault_dns_suffix(&self) -> &str {
        self.keyvault_dns_suffix
            .as_deref()
            .unwrap_or(AZURE_PUBLIC_KEYVAULT_SUFFIX)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VaultIdentity {
    pub address: String,
    /// Mount path of the JWT or Kubernetes auth method (`jwt`, `kubernetes`, ...).
    pub auth_mount: String,
    pub role: String,
    pub namespace: Option<String>,
    /// PEM CA bundle to verify Vault's certificate with (instead of the public roots).
    pub ca_file: Option<PathBuf>,
    /// Name Vault's certificate is verified against, when it is not the address's host.
    pub tls_server_name: Option<String>,
    /// Audience of the service-account token presented at login (CSIDriver tokenRequests);
    /// default `vault`.
    pub audience: Option<String>,
}

impl VaultIdentity {
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or("vault")
    }
}

/// The identity a binding grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Local(LocalIdentity),
    Azure(AzureIdentity),
    Vault(VaultIdentity),
}

impl Identity {
    pub fn provider(&self) -> ProviderKind {
        match self {
            Identity::Local(_) => ProviderKind::Local,
            Identity::Azure(_) => ProviderKind::Azure,
            Identity::Vault(_) => ProviderKind::Vault,
        }
    }

    /// A non-secret key naming this identity in caches, metrics and audit records.
    pub fn key(&self) -> String {
        match self {
            Identity::Local(l) => format!("local:{}", l.path.display()),
            Identity::Azure(a) => match &a.managed_identity {
                None => format!("azure:{}/{}", a.tenant_id, a.client_id),
                Some(mi) => format!("azure:{}/managed:{}", a.tenant_id, mi.client_id),
            },
            Identity::Vault(v) => format!(
                "vault:{}/{}{}/{}",
                v.address.trim_end_matches('/'),
                v.namespace
                    .as_deref()
                    .map(|n| format!("{n}:"))
                    .unwrap_or_default(),
                v.auth_mount.trim_matches('/'),
                v.role
            ),
        }
    }
}

/// An object pattern: an exact name, or a prefix ending in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an object pattern is empty".into());
        }
        match s.strip_suffix('*') {
            Some(p) if p.contains('*') => {
                Err(format!("object pattern {s:?}: '*' may only end a pattern"))
            }
            Some(p) => Ok(Pattern::Prefix(p.to_owned())),
            None if s.contains('*') => {
                Err(format!("object pattern {s:?}: '*' may only end a pattern"))
            }
            None => Ok(Pattern::Exact(s.to_owned())),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(e) => e == name,
            Pattern::Prefix(p) => name.starts_with(p.as_str()) && !name[p.len()..].contains(".."),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(e) => f.write_str(e),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub namespace: String,
    pub service_accounts: BTreeSet<String>,
    pub identity: Identity,
    pub objects: Vec<Pattern>,
    /// Who may open the files of the volumes it grants.
    pub readers: Readers,
}

/// What an authorized volume may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub binding: String,
    pub identity: Identity,
    pub readers: Readers,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bindings {
    pub list: Vec<Binding>,
}

#[derive(Debug, thiserror::Error)]
#[error("bindings file {path}: {error}")]
pub struct BindingsError {
    pub path: PathBuf,
    pub error: String,
}

fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

impl Bindings {
    pub fn load(path: &Path) -> Result<Self, BindingsError> {
        let text = std::fs::read_to_string(path).map_err(|e| BindingsError {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        Self::parse(&text).map_err(|error| BindingsError {
            path: path.to_owned(),
            error,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mut names = BTreeSet::new();
        let mut list = Vec::with_capacity(raw.bindings.len());
        for (i, b) in raw.bindings.into_iter().enumerate() {
            let at = |e: String| format!("bindings[{i}] ({}): {e}", b.name);
            if b.name.is_empty() || !names.insert(b.name.clone()) {
                return Err(at("name must be non-empty and unique".into()));
            }
            if !valid_k8s_name(&b.namespace) {
                return Err(at(format!(
                    "namespace {:?} is not a namespace name (wildcards are not allowed)",
                    b.namespace
                )));
            }
            if b.service_accounts.is_empty() {
                return Err(at(
                    "serviceAccounts must name at least one service account".into()
                ));
            }
            for sa in &b.service_accounts {
                if !valid_k8s_name(sa) {
                    return Err(at(format!(
                        "service account {sa:?} is not a service account name (wildcards are not allowed)"
                    )));
                }
            }
            let identity = match (b.identity.local, b.identity.azure, b.identity.vault) {
                (Some(l), None, None) => {
                    if !l.path.is_absolute() {
                        return Err(at("identity.local.path must be absolute".into()));
                    }
                    Identity::Local(l)
                }
                (None, Some(a), None) => {
                    if a.tenant_id.is_empty() {
                        return Err(at("identity.azure needs tenantID".into()));
                    }
                    match &a.managed_identity {
                        None if a.client_id.is_empty() => {
                            return Err(at(
                                "identity.azure needs clientID (workload identity federation) or managedIdentity: {clientID: ...}".into(),
                            ));
                        }
                        Some(mi) if mi.client_id.is_empty() => {
                            return Err(at("identity.azure.managedIdentity needs clientID".into()));
                        }
                        Some(_) if !a.client_id.is_empty() => {
                            return Err(at(
                                "identity.azure grants either clientID (workload identity federation) or managedIdentity, not both".into(),
                            ));
                        }
                        _ => {}
                    }
                    for (field, v) in [("authorityHost", a.authority_host.as_deref())] {
                        if let Some(v) = v
                            && !v.starts_with("https://")
                        {
                            return Err(at(format!(
                                "identity.azure.{field} must be an https:// URL"
                            )));
                        }
                    }
                    if let Some(sfx) = &a.keyvault_dns_suffix
                        && (sfx.is_empty()
                            || sfx.starts_with('.')
                            || !sfx.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':'
                            }))
                    {
                        return Err(at(
                            "identity.azure.keyvaultDNSSuffix must be a DNS name such as vault.azure.net (a port may follow)".into(),
                        ));
                    }
                    if let Some(f) = &a.ca_file
                        && !f.is_absolute()
                    {
                        return Err(at("identity.azure.caFile must be absolute".into()));
                    }
                    Identity::Azure(a)
                }
                (None, None, Some(v)) => {
                    if v.address.is_empty() || v.auth_mount.is_empty() || v.role.is_empty() {
                        return Err(at("identity.vault needs address, authMount and role".into()));
                    }
                    Identity::Vault(v)
                }
                _ => {
                    return Err(at(
                        "identity must name exactly one of local, azure, vault".into()
                    ));
                }
            };
            if b.objects.is_empty() {
                return Err(at(
                    "objects must grant at least one object or pattern".into()
                ));
            }
            let objects = b
                .objects
                .iter()
                .map(|o| Pattern::parse(o))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let readers = Readers::parse(b.readers.as_deref(), b.executables).map_err(at)?;
            list.push(Binding {
                name: b.name,
                namespace: b.namespace,
                service_accounts: b.service_accounts.into_iter().collect(),
                identity,
                objects,
                readers,
            });
        }
        Ok(Self { list })
    }

    /// Whether some binding lets only its pods open their volumes' files (`readers: pod`).
    pub fn enforces_readers(&self) -> bool {
        self.list.iter().any(|b| b.readers.enforced())
    }

    /// Decides a request. A denial names the pod, what it asked for and why each candidate
    /// binding does not grant it.
    pub fn authorize(&self, req: &VolumeRequest) -> Result<Grant, String> {
        self.decide(&req.pod, req.provider, &req.identity, &req.object_names())
    }

    pub fn decide(
        &self,
        pod: &PodInfo,
        provider: ProviderKind,
        ask: &IdentityRequest,
        objects: &[String],
    ) -> Result<Grant, String> {
        let asked = format!("{pod} asked for {provider} objects {objects:?}");
        let selecting: Vec<&Binding> = self
            .list
            .iter()
            .filter(|b| {
                b.namespace == pod.namespace && b.service_accounts.contains(&pod.service_account)
            })
            .collect();
        if selecting.is_empty() {
            return Err(format!(
                "denied: {asked}, but no binding selects namespace {:?} and service account {:?}",
                pod.namespace, pod.service_account
            ));
        }
        let mut reasons = Vec::new();
        for b in &selecting {
            match check_binding(b, provider, ask, objects) {
                Ok(()) => {
                    return Ok(Grant {
                        binding: b.name.clone(),
                        identity: b.identity.clone(),
                        readers: b.readers.clone(),
                    });
                }
                Err(why) => reasons.push(format!("binding {:?} {why}", b.name)),
            }
        }
        Err(format!("denied: {asked}: {}", reasons.join("; ")))
    }
}

fn check_binding(
    b: &Binding,
    provider: ProviderKind,
    ask: &IdentityRequest,
    objects: &[String],
) -> Result<(), String> {
    if b.identity.provider() != provider {
        return Err(format!(
            "grants a {} identity, not {provider}",
            b.identity.provider()
        ));
    }
    let differs = |what: &str, granted: &str, asked: &str| {
        format!("grants {what} {granted:?}, the volume asks for {asked:?}")
    };
    match &b.identity {
        Identity::Local(_) => {}
        Identity::Azure(a) => {
            if let Some(t) = &ask.tenant_id
                && t != &a.tenant_id
            {
                return Err(differs("tenantID", &a.tenant_id, t));
            }
            match &a.managed_identity {
                None => {
                    if ask.use_vm_managed_identity {
                        return Err("grants workload identity federation, not the node's managed identity (useVMManagedIdentity)".into());
                    }
                    if let Some(c) = &ask.client_id
                        && c != &a.client_id
                    {
                        return Err(differs("clientID", &a.client_id, c));
                    }
                }
                Some(mi) => {
                    if !ask.use_vm_managed_identity {
                        return Err(format!(
                            "grants the managed identity {:?}; the volume must set useVMManagedIdentity: \"true\"",
                            mi.client_id
                        ));
                    }
                    if let Some(c) = ask
                        .user_assigned_identity_id
                        .as_ref()
                        .or(ask.client_id.as_ref())
                        && c != &mi.client_id
                    {
                        return Err(differs("userAssignedIdentityID", &mi.client_id, c));
                    }
                }
            }
            if !a.keyvaults.is_empty() {
                match &ask.keyvault_name {
                    Some(kv) if a.keyvaults.contains(kv) => {}
                    Some(kv) => return Err(format!("does not grant Key Vault {kv:?}")),
                    None => return Err("needs keyvaultName to be one of its keyvaults".into()),
                }
            }
        }
        Identity::Vault(v) => {
            match &ask.role_name {
                Some(r) if r == &v.role => {}
                Some(r) => return Err(differs("roleName", &v.role, r)),
                None => {
                    return Err(format!(
                        "grants role {:?}; the volume must set roleName",
                        v.role
                    ));
                }
            }
            if let Some(a) = &ask.vault_address
                && a.trim_end_matches('/') != v.address.trim_end_matches('/')
            {
                return Err(differs("vaultAddress", &v.address, a));
            }
            if let Some(m) = &ask.auth_mount
                && m.trim_matches('/') != v.auth_mount.trim_matches('/')
            {
                return Err(differs("auth mount", &v.auth_mount, m));
            }
            if ask.vault_namespace.is_some() && ask.vault_namespace != v.namespace {
                return Err(differs(
                    "vaultNamespace",
                    v.namespace.as_deref().unwrap_or(""),
                    ask.vault_namespace.as_deref().unwrap_or(""),
                ));
            }
        }
    }
    let outside: Vec<&String> = objects
        .iter()
        .filter(|o| !b.objects.iter().any(|p| p.matches(o)))
        .collect();
    if !outside.is_empty() {
        let mut why = format!("does not grant objects {outside:?}");
        if matches!(b.identity, Identity::Vault(_)) {
            // Bindings match a Vault path as the volume writes it. KV v2 accepts both
            // `secret/x` and `secret/data/x`; say so when the other spelling is granted.
            for o in &outside {
                if let Some(alt) = kv2_other_spelling(o)
                    && b.objects.iter().any(|p| p.matches(&alt))
                {
                    why.push_str(&format!(
                        " (it grants {alt:?}: bindings match Vault paths as written, so for a KV v2 mount write the path in the volume the way the binding does, with or without data/)"
                    ));
                }
            }
        }
        return Err(why);
    }
    Ok(())
}

/// The other way to write a KV v2 path: with `data/` after the first segment or without it.
/// Only a hint for denials; a binding never grants through it (on a KV v1 mount the two are
/// different secrets).
fn kv2_other_spelling(path: &str) -> Option<String> {
    let (mount, rest) = path.split_once('/')?;
    Some(match rest.strip_prefix("data/") {
        Some(r) => format!("{mount}/{r}"),
        None => format!("{mount}/data/{rest}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
bindings:
  - name: team-a-dev
    namespace: team-a
    serviceAccounts: [api]
    identity: {local: {path: /srv/secrets}}
    objects: ["db", "api-*"]
  - name: team-a-azure
    namespace: team-a
    serviceAccounts: [api]
    identity: {azure: {tenantID: t1, clientID: c1, keyvaults: [kv1]}}
    objects: ["secret/*"]
  - name: team-a-mi
    namespace: team-a
    serviceAccounts: [batch]
    identity: {azure: {tenantID: t1, managedIdentity: {clientID: mi-1}}}
    objects: ["secret/*"]
  - name: team-b-vault
    namespace: team-b
    serviceAccounts: [app]
    identity: {vault: {address: "https://vault:8200", authMount: jwt, role: app}}
    objects: ["secret/data/team-b/*"]
"#;

    #[test]
    fn kv2_spelling_is_explained_never_granted() {
        let b = Bindings::parse(FILE).unwrap();
        let ask = IdentityRequest {
            role_name: Some("app".into()),
            ..Default::default()
        };
        let e = b
            .decide(
                &pod("team-b", "app"),
                ProviderKind::Vault,
                &ask,
                &["secret/team-b/db".into()],
            )
            .unwrap_err();
        assert!(e.contains("it grants \"secret/data/team-b/db\""), "{e}");
        assert!(
            b.decide(
                &pod("team-b", "app"),
                ProviderKind::Vault,
                &ask,
                &["secret/data/team-b/db".into()],
            )
            .is_ok()
        );
    }

    fn pod(ns: &str, sa: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: "p".into(),
            uid: "u".into(),
            service_account: sa.into(),
        }
    }

    fn objs(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grants_only_what_a_binding_names() {
        let b = Bindings::parse(FILE).unwrap();
        let none = IdentityRequest::default();
        let g = b
            .decide(
                &pod("team-a", "api"),
                ProviderKind::Local,
                &none,
                &objs(&["db", "api-key"]),
            )
            .unwrap();
        assert_eq!(g.binding, "team-a-dev");
        let cases: Vec<(PodInfo, ProviderKind, IdentityRequest, Vec<String>, &str)> = vec![
            (
                pod("team-a", "api"),
                ProviderKind::Local,
                none.clone(),
                objs(&["payroll"]),
                "does not grant objects [\"payroll\"]",
            ),
            (
                pod("team-a", "web"),
                ProviderKind::Local,
                none.clone(),
                objs(&["db"]),
                "no binding selects",
            ),
            (
                pod("team-c", "api"),
                ProviderKind::Local,
                none.clone(),
                objs(&["db"]),
                "no binding selects",
            ),
            (
                pod("team-a", "api"),
                ProviderKind::Vault,
                none.clone(),
                objs(&["db"]),
                "not vault",
            ),
            (
                pod("team-a", "api"),
                ProviderKind::Local,
                none.clone(),
                objs(&["api-../db"]),
                "does not grant",
            ),
        ];
        for (p, prov, ask, o, want) in cases {
            let e = b.decide(&p, prov, &ask, &o).unwrap_err();
            assert!(e.contains(want) && e.contains(&p.namespace), "{e}");
        }
    }

    #[test]
    fn a_volume_cannot_pick_another_identity() {
        let b = Bindings::parse(FILE).unwrap();
        let wi = IdentityRequest {
            tenant_id: Some("t1".into()),
            client_id: Some("c1".into()),
            keyvault_name: Some("kv1".into()),
            ..Default::default()
        };
        assert!(
            b.decide(
                &pod("team-a", "api"),
                ProviderKind::Azure,
                &wi,
                &objs(&["secret/x"])
            )
            .is_ok()
        );
        let other_client = IdentityRequest {
            client_id: Some("c2".into()),
            ..wi.clone()
        };
        assert!(
            b.decide(
                &pod("team-a", "api"),
                ProviderKind::Azure,
                &other_client,
                &objs(&["secret/x"])
            )
            .unwrap_err()
            .contains("clientID")
        );
        let other_vault = IdentityRequest {
            keyvault_name: Some("kv2".into()),
            ..wi.clone()
        };
        assert!(
            b.decide(
                &pod("team-a", "api"),
                ProviderKind::Azure,
                &other_vault,
                &objs(&["secret/x"])
            )
            .unwrap_err()
            .contains("kv2")
        );
        // The node's managed identity only for the binding that grants it.
        let mi = IdentityRequest {
            use_vm_managed_identity: true,
            user_assigned_identity_id: Some("mi-1".into()),
            ..Default::default()
        };
        assert!(
            b.decide(
                &pod("team-a", "api"),
                ProviderKind::Azure,
                &mi,
                &objs(&["secret/x"])
            )
            .unwrap_err()
            .contains("managed identity")
        );
        assert!(
            b.decide(
                &pod("team-a", "batch"),
                ProviderKind::Azure,
                &mi,
                &objs(&["secret/x"])
            )
            .is_ok()
        );
        // Vault: the role must be the granted one.
        let role = |r: &str| IdentityRequest {
            role_name: Some(r.into()),
            ..Default::default()
        };
        assert!(
            b.decide(
                &pod("team-b", "app"),
                ProviderKind::Vault,
                &role("app"),
                &objs(&["secret/data/team-b/db"])
            )
            .is_ok()
        );
        assert!(
            b.decide(
                &pod("team-b", "app"),
                ProviderKind::Vault,
                &role("admin"),
                &objs(&["secret/data/team-b/db"])
            )
            .unwrap_err()
            .contains("roleName")
        );
    }

    #[test]
    fn invalid_files_are_rejected_with_the_binding_named() {
        let cases = [
            (
                "bindings:\n  - {name: x, namespace: \"*\", serviceAccounts: [a], identity: {local: {path: /s}}, objects: [a]}\n",
                "wildcards",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [\"*\"], identity: {local: {path: /s}}, objects: [a]}\n",
                "wildcards",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [a], identity: {}, objects: [a]}\n",
                "exactly one",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [a], identity: {local: {path: rel}}, objects: [a]}\n",
                "absolute",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [a], identity: {local: {path: /s}}, objects: [\"a*b\"]}\n",
                "may only end",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [a], identity: {local: {path: /s}}, objects: []}\n",
                "at least one",
            ),
            (
                "bindings:\n  - {name: x, namespace: n, serviceAccounts: [a], identity: {local: {path: /s}}, objects: [a], labels: {}}\n",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = Bindings::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}

/// Properties over many generated binding files and requests: default deny holds whatever
/// the names, patterns and objects.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const NAMESPACES: [&str; 3] = ["team-a", "team-b", "team-c"];
    const ACCOUNTS: [&str; 3] = ["api", "batch", "web"];

    /// Object names and patterns from a small alphabet that has the characters that matter:
    /// separators, dots (for `..`) and the pattern star.
    fn name() -> impl Strategy<Value = String> {
        "[ab./-]{0,6}"
    }

    fn pattern() -> impl Strategy<Value = String> {
        (name(), any::<bool>()).prop_map(|(n, star)| if star { format!("{n}*") } else { n })
    }

    fn binding() -> impl Strategy<Value = (usize, Vec<usize>, Vec<String>)> {
        (
            0..NAMESPACES.len(),
            proptest::collection::vec(0..ACCOUNTS.len(), 1..3),
            proptest::collection::vec(pattern(), 1..4),
        )
    }

    /// A binding file in the operator's YAML; patterns that do not parse are left out (the
    /// loader refuses them, tested elsewhere).
    fn file(bs: &[(usize, Vec<usize>, Vec<String>)]) -> String {
        let mut s = String::from("bindings:\n");
        for (i, (ns, sas, pats)) in bs.iter().enumerate() {
            let sas: Vec<&str> = sas.iter().map(|a| ACCOUNTS[*a]).collect();
            let pats: Vec<String> = pats
                .iter()
                .filter(|p| Pattern::parse(p).is_ok())
                .map(|p| format!("{p:?}"))
                .collect();
            let pats = if pats.is_empty() {
                vec!["\"none\"".into()]
            } else {
                pats
            };
            s.push_str(&format!(
                "  - name: b{i}\n    namespace: {}\n    serviceAccounts: [{}]\n    identity: {{local: {{path: /srv}}}}\n    objects: [{}]\n",
                NAMESPACES[*ns],
                sas.join(", "),
                pats.join(", ")
            ));
        }
        s
    }

    /// What a pattern grants, written out independently of `Pattern::matches`.
    fn grants(pattern: &str, object: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => object
                .strip_prefix(prefix)
                .is_some_and(|rest| !rest.contains("..")),
            None => pattern == object,
        }
    }

    proptest! {
        #[test]
        fn a_grant_needs_one_binding_that_selects_the_pod_and_names_every_object(
            bs in proptest::collection::vec(binding(), 0..5),
            ns in 0..NAMESPACES.len(),
            sa in 0..ACCOUNTS.len(),
            objects in proptest::collection::vec(name(), 1..4),
        ) {
            let text = file(&bs);
            let parsed = Bindings::parse(&text).unwrap();
            let pod = PodInfo {
                namespace: NAMESPACES[ns].into(),
                name: "p".into(),
                uid: "u".into(),
                service_account: ACCOUNTS[sa].into(),
            };
            let decision =
                parsed.decide(&pod, ProviderKind::Local, &IdentityRequest::default(), &objects);
            let allowed_by = |b: &Binding| {
                b.namespace == pod.namespace
                    && b.service_accounts.contains(&pod.service_account)
                    && objects
                        .iter()
                        .all(|o| b.objects.iter().any(|p| grants(&p.to_string(), o)))
            };
            match decision {
                Ok(g) => {
                    let b = parsed.list.iter().find(|b| b.name == g.binding).unwrap();
                    prop_assert!(allowed_by(b), "granted by {:?} for {:?}", b, objects);
                }
                Err(why) => {
                    prop_assert!(!parsed.list.iter().any(allowed_by), "denied: {}", why);
                    prop_assert!(why.starts_with("denied: "));
                }
            }
        }

        #[test]
        fn a_prefix_pattern_never_grants_a_path_that_climbs_out(
            prefix in "[ab/.]{0,5}",
            rest in "[ab/.]{0,8}",
        ) {
            let p = Pattern::parse(&format!("{prefix}*")).unwrap();
            let object = format!("{prefix}{rest}");
            prop_assert_eq!(p.matches(&object), !rest.contains(".."));
        }

        #[test]
        fn the_other_kv2_spelling_round_trips(path in "[a-z]{1,4}(/[a-z]{1,4}){0,3}") {
            if let Some(alt) = kv2_other_spelling(&path) {
                prop_assert_ne!(&alt, &path);
                prop_assert_eq!(kv2_other_spelling(&alt), Some(path.clone()));
            }
        }
    }
}
