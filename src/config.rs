//! The `keybroker mount` configuration file (YAML), parsed once into validated types.
//!
//! ```yaml
//! provider:
//!   local:
//!     path: secrets/          # a directory or a .yaml file; relative to this file
//! volume:
//!   type: fuse                # fuse (default) or tmpfs
//!   pollInterval: 2m          # refresh of values without a lease
//!   gid: 1000                 # group of the files (like fsGroup); default: the caller's
//!   limits: { maxFiles: 64, maxObjectBytes: 1048576, maxVolumeBytes: 8388608 }
//! audit:
//!   path: audit.jsonl         # relative to this file
//!   failClosed: false         # true: stop serving opens when the audit log cannot be written
//! files:
//!   - name: db-password       # file name in the volume
//!     object: db              # object at the provider
//!     key: password           # one key of a JSON object value
//!     mode: "0440"            # octal, as a string
//!     encoding: utf-8         # how the value is stored: utf-8, base64 or hex
//!   - name: database-url
//!     object: db
//!     template: "postgresql://{{username}}:{{password}}@db:5432/app"
//! ```
//!
//! Unknown fields are errors (a typo must not silently drop a setting).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::volume::VolumeKind;
use crate::volume::content::{
    ContentError, Encoding, FileName, FileSource, FileSpec, Limits, Template, VolumeContent,
};

pub const DEFAULT_POLL: Duration = Duration::from_secs(120);
pub const DEFAULT_MODE: u32 = 0o440;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    provider: RawProvider,
    #[serde(default)]
    volume: RawVolume,
    #[serde(default)]
    audit: RawAudit,
    files: Vec<RawFile>,
    #[serde(default)]
    on_change: Vec<RawAction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProvider {
    local: Option<RawLocal>,
    vault: Option<RawVault>,
    azure: Option<RawAzure>,
}

/// Vault/OpenBao as the pod itself: JWT or Kubernetes auth with the pod's projected
/// service-account token file (re-read as kubelet rotates it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVault {
    address: String,
    auth_mount: Option<String>,
    role: String,
    namespace: Option<String>,
    ca_file: Option<PathBuf>,
    tls_server_name: Option<String>,
    token_file: Option<PathBuf>,
}

/// Azure Key Vault as the pod itself: workload identity (the webhook's environment, or these
/// fields), or a managed identity the config names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAzure {
    keyvault_name: String,
    #[serde(rename = "tenantID")]
    tenant_id: Option<String>,
    #[serde(rename = "clientID")]
    client_id: Option<String>,
    token_file: Option<PathBuf>,
    authority_host: Option<String>,
    #[serde(rename = "keyvaultDNSSuffix")]
    keyvault_dns_suffix: Option<String>,
    ca_file: Option<PathBuf>,
    managed_identity: Option<RawManaged>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManaged {
    #[serde(rename = "clientID")]
    client_id: String,
}

/// What to do after a complete, consistent write that changed files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAction {
    signal: Option<RawSignal>,
    http: Option<RawHttp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSignal {
    /// The process name (`comm`, as `ps` shows it).
    process: String,
    #[serde(default = "default_signal")]
    signal: String,
}

fn default_signal() -> String {
    "HUP".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    url: String,
    #[serde(default = "default_method")]
    method: String,
    timeout: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLocal {
    path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVolume {
    #[serde(rename = "type")]
    kind: Option<VolumeKind>,
    poll_interval: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    fuse_threads: Option<usize>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLimits {
    max_files: Option<usize>,
    max_object_bytes: Option<usize>,
    max_volume_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAudit {
    path: Option<PathBuf>,
    #[serde(default)]
    fail_closed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    name: String,
    object: String,
    key: Option<String>,
    version: Option<String>,
    encoding: Option<String>,
    mode: Option<serde_norway::Value>,
    template: Option<String>,
    /// Vault: a write-style read (`POST` to `pki/issue/web` with `secretArgs`).
    method: Option<String>,
    secret_args: Option<serde_norway::Value>,
    /// Actions run when this file changed (in addition to the volume's).
    #[serde(default)]
    on_change: Vec<RawAction>,
}

/// Where secrets come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderConfig {
    Local {
        path: PathBuf,
    },
    Vault {
        address: String,
        auth_mount: String,
        role: String,
        namespace: Option<String>,
        ca_file: Option<PathBuf>,
        tls_server_name: Option<String>,
        /// The pod's projected service-account token (audience per the pod spec).
        token_file: PathBuf,
    },
    Azure {
        keyvault: String,
        tenant_id: String,
        /// Workload identity: the app's client ID and the federated token file.
        client_id: Option<String>,
        token_file: Option<PathBuf>,
        /// Instead: a managed identity's client ID.
        managed_identity: Option<String>,
        authority_host: String,
        keyvault_dns_suffix: String,
        ca_file: Option<PathBuf>,
    },
}

/// A rotation notice to the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeAction {
    /// Send `signal` to every process of this name in the pod (shared process namespace).
    Signal { process: String, signal: i32 },
    /// An HTTP request to a local endpoint.
    Http {
        url: String,
        method: String,
        timeout: Duration,
    },
}

/// The Kubernetes projected token path keybroker reads by default for Vault.
pub const DEFAULT_VAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/vault-token";

/// A validated `keybroker mount` configuration.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub provider: ProviderConfig,
    pub content: VolumeContent,
    pub kind: VolumeKind,
    pub poll: Duration,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub fuse_threads: usize,
    pub audit_path: PathBuf,
    pub fail_closed: bool,
    pub on_change: Vec<ChangeAction>,
    /// Actions for one file each: (file name, actions), run when that file changed.
    pub file_on_change: Vec<(String, Vec<ChangeAction>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("{path} is not a valid keybroker config: {error}")]
    Syntax { path: PathBuf, error: String },
    #[error("{path}: {field}: {error}")]
    Invalid {
        path: PathBuf,
        field: String,
        error: String,
    },
}

/// Parses a mode given as an octal string ("0440", "440").
pub fn parse_mode(v: &serde_norway::Value) -> Result<u32, String> {
    let s = match v {
        serde_norway::Value::String(s) => s.as_str(),
        _ => return Err("write the mode as a quoted octal string, e.g. \"0440\"".into()),
    };
    // The mode may come from a pod: the message describes it without quoting it.
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| "is not an octal mode such as \"0440\"".to_string())?;
    if m > 0o777 {
        return Err("has bits beyond 0777 (setuid/setgid/sticky are not allowed)".into());
    }
    Ok(m)
}

impl MountConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_env(&text, path, base, &|k| std::env::var(k).ok())
    }

    /// Parses `text` (read from `path`); relative paths are taken from `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_env(text, path, base, &|_| None)
    }

    /// [`MountConfig::parse`], with the environment the Azure workload identity webhook sets
    /// (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`,
    /// `AZURE_AUTHORITY_HOST`) filling what the config leaves out.
    pub fn parse_env(
        text: &str,
        path: &Path,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        let invalid = |field: String, error: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            error,
        };
        let provider = parse_provider(raw.provider, base, env, &invalid)?;
        let mut on_change = Vec::new();
        for (i, a) in raw.on_change.into_iter().enumerate() {
            on_change.push(parse_action(a, &format!("onChange[{i}]"), &invalid)?);
        }
        let defaults = Limits::default();
        let limits = Limits {
            max_files: raw.volume.limits.max_files.unwrap_or(defaults.max_files),
            max_object_bytes: raw
                .volume
                .limits
                .max_object_bytes
                .unwrap_or(defaults.max_object_bytes),
            max_volume_bytes: raw
                .volume
                .limits
                .max_volume_bytes
                .unwrap_or(defaults.max_volume_bytes),
        };
        let poll = match &raw.volume.poll_interval {
            None => DEFAULT_POLL,
            Some(s) => humantime::parse_duration(s).map_err(|e| {
                invalid(
                    "volume.pollInterval".into(),
                    format!("\"{s}\": {e} (write e.g. 30s or 2m)"),
                )
            })?,
        };
        if poll < Duration::from_millis(500) {
            return Err(invalid(
                "volume.pollInterval".into(),
                "must be at least 500ms".into(),
            ));
        }
        let mut files = Vec::with_capacity(raw.files.len());
        let mut file_on_change = Vec::new();
        for (i, f) in raw.files.into_iter().enumerate() {
            let (spec, actions) = parse_file(i, f, &provider, &invalid)?;
            if !actions.is_empty() {
                file_on_change.push((spec.name.as_str().to_owned(), actions));
            }
            files.push(spec);
        }
        let content = VolumeContent::new(files, limits)
            .map_err(|e| invalid("files".into(), e.to_string()))?;
        Ok(Self {
            provider,
            content,
            kind: raw.volume.kind.unwrap_or_default(),
            poll,
            uid: raw.volume.uid,
            gid: raw.volume.gid,
            fuse_threads: raw.volume.fuse_threads.unwrap_or(2).clamp(1, 16),
            audit_path: match raw.audit.path {
                // Standard output (init and sidecar): kept as written.
                Some(p) if p == Path::new("-") => p,
                p => base.join(p.unwrap_or_else(|| PathBuf::from("keybroker-audit.jsonl"))),
            },
            fail_closed: raw.audit.fail_closed,
            on_change,
            file_on_change,
        })
    }
}

/// The `provider:` section: exactly one of local, vault, azure; Azure's missing fields from the
/// workload identity webhook's environment.
fn parse_provider(
    raw: RawProvider,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<ProviderConfig, ConfigError> {
    Ok(match (raw.local, raw.vault, raw.azure) {
        (Some(l), None, None) => ProviderConfig::Local {
            path: base.join(l.path),
        },
        (None, Some(v), None) => {
            if !(v.address.starts_with("https://") || v.address.starts_with("http://")) {
                return Err(invalid(
                    "provider.vault.address".into(),
                    "must be an https:// URL (http only on loopback)".into(),
                ));
            }
            if v.role.is_empty() {
                return Err(invalid("provider.vault.role".into(), "is required".into()));
            }
            ProviderConfig::Vault {
                address: v.address,
                auth_mount: v.auth_mount.unwrap_or_else(|| "jwt".into()),
                role: v.role,
                namespace: v.namespace,
                ca_file: v.ca_file.map(|f| base.join(f)),
                tls_server_name: v.tls_server_name,
                token_file: v
                    .token_file
                    .map(|f| base.join(f))
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_VAULT_TOKEN_FILE)),
            }
        }
        (None, None, Some(a)) => {
            let field = |f: &str| format!("provider.azure.{f}");
            let tenant_id = a
                .tenant_id
                .or_else(|| env("AZURE_TENANT_ID"))
                .ok_or_else(|| {
                    invalid(field("tenantID"), "is required (or AZURE_TENANT_ID)".into())
                })?;
            let managed_identity = a.managed_identity.map(|m| m.client_id);
            let (client_id, token_file) = if managed_identity.is_some() {
                (None, None)
            } else {
                let c = a.client_id.or_else(|| env("AZURE_CLIENT_ID")).ok_or_else(|| {
                    invalid(
                        field("clientID"),
                        "is required for workload identity (or AZURE_CLIENT_ID); or name a managedIdentity".into(),
                    )
                })?;
                let t = a
                    .token_file
                    .map(|f| base.join(f))
                    .or_else(|| env("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from))
                    .ok_or_else(|| {
                        invalid(
                            field("tokenFile"),
                            "is required for workload identity (or AZURE_FEDERATED_TOKEN_FILE)"
                                .into(),
                        )
                    })?;
                (Some(c), Some(t))
            };
            let authority_host = a
                .authority_host
                .or_else(|| env("AZURE_AUTHORITY_HOST"))
                .unwrap_or_else(|| "https://login.microsoftonline.com".into())
                .trim_end_matches('/')
                .to_owned();
            if !authority_host.starts_with("https://") {
                return Err(invalid(
                    field("authorityHost"),
                    "must be an https:// URL".into(),
                ));
            }
            ProviderConfig::Azure {
                keyvault: a.keyvault_name,
                tenant_id,
                client_id,
                token_file,
                managed_identity,
                authority_host,
                keyvault_dns_suffix: a
                    .keyvault_dns_suffix
                    .unwrap_or_else(|| "vault.azure.net".into()),
                ca_file: a.ca_file.map(|f| base.join(f)),
            }
        }
        (None, None, None) => {
            return Err(invalid(
                "provider".into(),
                "name a provider: `local: {path: ...}`, `vault: {...}` or `azure: {...}`".into(),
            ));
        }
        _ => {
            return Err(invalid(
                "provider".into(),
                "name exactly one provider (local, vault or azure)".into(),
            ));
        }
    })
}

/// `files[i]`: its name, object, mode and source checked (and what its provider needs of it),
/// with its own `onChange` actions.
fn parse_file(
    i: usize,
    mut f: RawFile,
    provider: &ProviderConfig,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<(FileSpec, Vec<ChangeAction>), ConfigError> {
    let field = |sub: &str| format!("files[{i}].{sub}");
    let actions = std::mem::take(&mut f.on_change)
        .into_iter()
        .enumerate()
        .map(|(k, a)| parse_action(a, &format!("files[{i}].onChange[{k}]"), &invalid))
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = |sub: &str, e: ContentError| invalid(field(sub), e.to_string());
    let name = FileName::parse(&f.name).map_err(|e| ctx("name", e))?;
    if f.object.is_empty() || f.object.chars().any(char::is_control) {
        return Err(invalid(
            field("object"),
            "must be a non-empty object name".into(),
        ));
    }
    let mode = match &f.mode {
        None => DEFAULT_MODE,
        Some(v) => parse_mode(v).map_err(|e| invalid(field("mode"), e))?,
    };
    let source = match (f.template, f.key, f.encoding) {
        (Some(_), Some(_), _) => {
            return Err(invalid(
                field("template"),
                "use either `template` or `key`, not both".into(),
            ));
        }
        (Some(_), _, Some(_)) => {
            return Err(invalid(
                field("template"),
                "`encoding` does not apply to a template".into(),
            ));
        }
        (Some(t), None, None) => {
            FileSource::Template(Template::parse(&t).map_err(|e| ctx("template", e))?)
        }
        (None, key, enc) => FileSource::Object {
            key,
            encoding: match enc {
                None => Encoding::Utf8,
                Some(e) => Encoding::parse(&e).map_err(|e| ctx("encoding", e))?,
            },
        },
    };
    if !matches!(provider, ProviderConfig::Vault { .. })
        && (f.method.is_some() || f.secret_args.is_some())
    {
        return Err(invalid(
            field("method"),
            "method and secretArgs are for the vault provider".into(),
        ));
    }
    let params = match &provider {
        ProviderConfig::Vault { .. } => {
            let args =
                match &f.secret_args {
                    None => None,
                    Some(a) => Some(serde_json::to_value(a).map_err(|_| {
                        invalid(field("secretArgs"), "must be a map of values".into())
                    })?),
                };
            crate::provider::vault::encode_params(
                f.method.as_deref().unwrap_or("GET"),
                args.as_ref(),
            )
            .map_err(|e| invalid(field("method"), e.to_string()))?
        }
        ProviderConfig::Azure { keyvault, .. } => {
            if !["secret/", "cert/", "key/"]
                .iter()
                .any(|p| f.object.starts_with(p))
            {
                return Err(invalid(
                    field("object"),
                    "Key Vault objects are secret/NAME, cert/NAME or key/NAME".into(),
                ));
            }
            Some(format!("vault={keyvault}&format=pem"))
        }
        _ => None,
    };
    Ok((
        FileSpec {
            name,
            object: f.object,
            version: f.version,
            params,
            mode,
            source,
        },
        actions,
    ))
}

/// One `onChange` action, validated; `at` names it in errors (`onChange[0]`).
fn parse_action(
    a: RawAction,
    at: &str,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<ChangeAction, ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    Ok(match (a.signal, a.http) {
        (Some(sig), None) => {
            let name = sig.signal.trim_start_matches("SIG");
            let signal = match name {
                "HUP" => libc::SIGHUP,
                "USR1" => libc::SIGUSR1,
                "USR2" => libc::SIGUSR2,
                "TERM" => libc::SIGTERM,
                "INT" => libc::SIGINT,
                _ => {
                    return Err(invalid(
                        field("signal.signal"),
                        "must be HUP, USR1, USR2, TERM or INT".into(),
                    ));
                }
            };
            if sig.process.is_empty() || sig.process.len() > 15 {
                return Err(invalid(
                    field("signal.process"),
                    "must be a process name as ps shows it (at most 15 characters)".into(),
                ));
            }
            ChangeAction::Signal {
                process: sig.process,
                signal,
            }
        }
        (None, Some(h)) => {
            let local = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"];
            if !local.iter().any(|p| h.url.starts_with(p)) {
                return Err(invalid(
                    field("http.url"),
                    "must be a localhost URL (http://127.0.0.1:PORT/...)".into(),
                ));
            }
            if !matches!(h.method.as_str(), "POST" | "PUT" | "GET") {
                return Err(invalid(
                    field("http.method"),
                    "must be POST, PUT or GET".into(),
                ));
            }
            let timeout = match &h.timeout {
                None => Duration::from_secs(5),
                Some(t) => humantime::parse_duration(t)
                    .map_err(|e| invalid(field("http.timeout"), format!("\"{t}\": {e}")))?,
            };
            ChangeAction::Http {
                url: h.url,
                method: h.method,
                timeout,
            }
        }
        _ => {
            return Err(invalid(
                at.to_owned(),
                "name exactly one action: signal or http".into(),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MountConfig, String> {
        MountConfig::parse(text, Path::new("c.yaml"), Path::new("/base")).map_err(|e| e.to_string())
    }

    const OK: &str = "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a}\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(OK).unwrap();
        assert_eq!(
            c.provider,
            ProviderConfig::Local {
                path: "/base/s".into()
            }
        );
        assert_eq!(c.kind, VolumeKind::Fuse);
        assert_eq!(c.poll, DEFAULT_POLL);
        assert_eq!(c.content.files[0].mode, 0o440);
        assert_eq!(c.audit_path, Path::new("/base/keybroker-audit.jsonl"));
        assert_eq!(c.content.limits, Limits::default());
    }

    #[test]
    fn each_mistake_names_its_field_and_rule() {
        let cases = [
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: /etc/x, object: a}\n",
                "files[0].name",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: ../x, object: a}\n",
                "'..'",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, mode: 440}\n",
                "quoted octal",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, mode: \"4755\"}\n",
                "setuid",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, encoding: rot13}\n",
                "files[0].encoding",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, template: \"{{x\"}\n",
                "files[0].template",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, tempalte: x}\n",
                "unknown field `tempalte`",
            ),
            (
                "provider: {local: {path: s}}\nvolume: {pollInterval: soon}\nfiles:\n  - {name: a, object: a}\n",
                "pollInterval",
            ),
            (
                "provider: {local: {path: s}}\nvolume: {type: nfs}\nfiles:\n  - {name: a, object: a}\n",
                "unknown variant `nfs`",
            ),
            (
                "provider: {}\nfiles:\n  - {name: a, object: a}\n",
                "name a provider",
            ),
            ("provider: {local: {path: s}}\nfiles: []\n", "no files"),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, onChange: [{http: {url: \"http://example.com/\"}}]}\n",
                "files[0].onChange[0].http.url",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a}\nonChange: [{signal: {process: x, signal: KILL}}]\n",
                "onChange[0].signal.signal",
            ),
            (
                "provider: {local: {path: s}}\nfiles:\n  - {name: a, object: a, method: POST}\n",
                "files[0].method",
            ),
            (
                "provider: {local: {path: s}}\nvolume: {limits: {maxFiles: 1}}\nfiles:\n  - {name: a, object: a}\n  - {name: b, object: b}\n",
                "at most 1",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}\n=> {err}");
        }
    }
}
