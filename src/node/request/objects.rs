//! `objects`: the volume's list of objects, in the Secrets Store Azure and Vault providers'
//! spellings or keybroker's own, each checked and turned into the files it becomes.

use super::*;

/// One entry of `objects`, in any of the three accepted spellings.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawObject {
    object_name: String,
    // Azure
    object_type: Option<String>,
    object_alias: Option<String>,
    object_version: Option<String>,
    object_version_history: Option<serde_norway::Value>,
    object_format: Option<String>,
    object_encoding: Option<String>,
    // Vault
    secret_path: Option<String>,
    secret_key: Option<String>,
    method: Option<String>,
    secret_args: Option<serde_norway::Value>,
    encoding: Option<String>,
    // local (keybroker)
    object: Option<String>,
    key: Option<String>,
    template: Option<String>,
    // all
    file_permission: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
pub(super) struct AzureObjects {
    array: Vec<String>,
}

pub(super) fn parse_objects(
    provider: ProviderKind,
    text: &str,
) -> Result<Vec<RawObject>, RequestError> {
    match provider {
        // The Azure provider's shape: `array:` of YAML documents, one per object.
        ProviderKind::Azure => {
            let outer: AzureObjects = untrusted::from_yaml(text, "objects").map_err(err)?;
            outer
                .array
                .iter()
                .enumerate()
                .map(|(i, doc)| {
                    untrusted::from_yaml::<RawObject>(doc, &format!("objects.array[{i}]"))
                        .map_err(err)
                })
                .collect()
        }
        ProviderKind::Vault | ProviderKind::Local => {
            untrusted::from_yaml(text, "objects").map_err(err)
        }
    }
}

pub(super) fn mode_of(
    v: &Option<serde_norway::Value>,
    i: usize,
    default_mode: u32,
) -> Result<u32, RequestError> {
    match v {
        None => Ok(default_mode),
        Some(v) => parse_mode(v).map_err(|e| err(format!("objects[{i}].filePermission: {e}"))),
    }
}

/// A Key Vault name as Azure allows it: 3-24 characters, letters, digits and dashes, starting
/// with a letter.
pub(super) fn valid_vault_name(v: &str) -> bool {
    (3..=24).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_alphabetic())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A Key Vault object name: 1-127 letters, digits and dashes.
pub(super) fn valid_kv_object_name(v: &str) -> bool {
    (1..=127).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// One object of a volume, as its provider names it: the file it becomes, the object and
/// version to fetch, how to render it, and what the provider must be told.
pub(super) struct ObjectRef {
    file: String,
    object: String,
    version: Option<String>,
    key: Option<String>,
    encoding: Option<String>,
    template: Option<String>,
    params: Option<String>,
    /// `objectVersionHistory` (Key Vault secrets).
    history: Option<usize>,
}

/// `objects[i]` of a Key Vault volume (the Secrets Store Azure provider's fields).
pub(super) fn azure_object(
    keyvault: Option<&str>,
    i: usize,
    o: RawObject,
) -> Result<ObjectRef, RequestError> {
    let at = |field: &str, e: &dyn std::fmt::Display| err(format!("objects[{i}].{field}: {e}"));
    let mut history = None;
    let kind = o.object_type.as_deref().unwrap_or("secret");
    if !matches!(kind, "secret" | "key" | "cert") {
        return Err(at("objectType", &"must be secret, key or cert"));
    }
    if let Some(f) = &o.object_format
        && !matches!(f.as_str(), "pem" | "pfx")
    {
        return Err(at("objectFormat", &"must be pem or pfx"));
    }
    if let Some(h) = &o.object_version_history {
        let n = match h {
            serde_norway::Value::Number(n) => n.as_u64(),
            serde_norway::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if n >= 1 && n <= MAX_VERSION_HISTORY as u64 => history = Some(n as usize),
            _ => {
                return Err(at(
                    "objectVersionHistory",
                    &format!("must be a number from 1 to {MAX_VERSION_HISTORY}"),
                ));
            }
        }
        if kind != "secret" {
            return Err(at(
                "objectVersionHistory",
                &"is only for objectType: secret",
            ));
        }
        if o.object_version.is_some() || o.key.is_some() || o.template.is_some() {
            return Err(at(
                "objectVersionHistory",
                &"cannot be combined with objectVersion, key or template",
            ));
        }
    }
    if !valid_kv_object_name(&o.object_name) {
        return Err(at(
            "objectName",
            &"must be a Key Vault object name (1-127 letters, digits and dashes)",
        ));
    }
    if let Some(v) = &o.object_version
        && !(v.is_empty() || v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(at(
            "objectVersion",
            &"must be a Key Vault version id (32 hex digits)",
        ));
    }
    let format = o.object_format.as_deref().unwrap_or("pem");
    if format == "pfx" && kind != "secret" {
        return Err(at("objectFormat", &"pfx is only for objectType: secret"));
    }
    if o.object_encoding.is_some() && kind != "secret" {
        return Err(at("objectEncoding", &"is only for objectType: secret"));
    }
    let vault = keyvault.expect("checked before the objects");
    let params = Some(match history {
        None => format!("vault={vault}&format={format}"),
        Some(n) => format!("vault={vault}&format={format}&history={n}"),
    });
    let file = o
        .object_alias
        .clone()
        .unwrap_or_else(|| o.object_name.clone());
    let object = format!("{kind}/{}", o.object_name);
    Ok(ObjectRef {
        file,
        object,
        version: o.object_version,
        key: o.key,
        encoding: o.object_encoding,
        template: o.template,
        params,
        history,
    })
}

/// `objects[i]` of a Vault volume (the Vault CSI provider's fields).
pub(super) fn vault_object(i: usize, o: RawObject) -> Result<ObjectRef, RequestError> {
    let at = |field: &str, e: &dyn std::fmt::Display| err(format!("objects[{i}].{field}: {e}"));
    let history = None;
    let raw_path = o
        .secret_path
        .clone()
        .ok_or_else(|| at("secretPath", &"is required"))?;
    // The Vault CSI provider's way to pin a KV v2 version: `secretPath: kv/data/x?version=3`.
    let (path, pinned) = match raw_path.split_once("?version=") {
        Some((p, v)) => (p.to_owned(), Some(v.to_owned())),
        None => (raw_path, None),
    };
    crate::provider::vault::check_path(&path).map_err(|e| at("secretPath", &e))?;
    let version = match (pinned, o.object_version) {
        (Some(a), Some(b)) if a != b => {
            return Err(at(
                "objectVersion",
                &"differs from the ?version= in secretPath",
            ));
        }
        (a, b) => a.or(b),
    };
    if let Some(v) = &version
        && (v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(at("secretPath", &"a KV v2 version must be a number"));
    }
    let args = match o.secret_args {
        None => None,
        Some(a) => Some(
            serde_json::to_value(&a).map_err(|_| at("secretArgs", &"must be a map of values"))?,
        ),
    };
    let params =
        crate::provider::vault::encode_params(o.method.as_deref().unwrap_or("GET"), args.as_ref())
            .map_err(|e| at("method", &e))?;
    if params.as_ref().is_some_and(|p| p.len() > 4096) {
        return Err(at("secretArgs", &"must be at most 4 KiB"));
    }
    Ok(ObjectRef {
        file: o.object_name.clone(),
        object: path,
        version,
        key: o.secret_key,
        encoding: o.encoding,
        template: o.template,
        params,
        history,
    })
}

/// `objects[i]` of a local volume.
pub(super) fn local_object(o: RawObject) -> Result<ObjectRef, RequestError> {
    let (params, history) = (None, None);
    let object = o.object.clone().unwrap_or_else(|| o.object_name.clone());
    let file = o
        .object_alias
        .clone()
        .unwrap_or_else(|| o.object_name.clone());
    Ok(ObjectRef {
        file,
        object,
        version: o.object_version,
        key: o.key,
        encoding: o.encoding.or(o.object_encoding),
        template: o.template,
        params,
        history,
    })
}

pub(super) fn file_spec(
    provider: ProviderKind,
    keyvault: Option<&str>,
    default_mode: u32,
    i: usize,
    o: RawObject,
) -> Result<Vec<FileSpec>, RequestError> {
    let at = |field: &str, e: &dyn std::fmt::Display| err(format!("objects[{i}].{field}: {e}"));
    let mode = mode_of(&o.file_permission, i, default_mode)?;
    let ObjectRef {
        file,
        object,
        version,
        key,
        encoding,
        template,
        params,
        history,
    } = match provider {
        ProviderKind::Azure => azure_object(keyvault, i, o)?,
        ProviderKind::Vault => vault_object(i, o)?,
        ProviderKind::Local => local_object(o)?,
    };
    let name = FileName::parse(&file).map_err(|e| at("objectName", &e.without_input()))?;
    if object.is_empty() || object.len() > 1024 || object.chars().any(char::is_control) {
        return Err(at(
            "objectName",
            &"must be a non-empty object name of at most 1024 bytes",
        ));
    }
    let source = match template {
        Some(t) => {
            if key.is_some() {
                return Err(at("template", &"use either template or key, not both"));
            }
            FileSource::Template(
                Template::parse(&t).map_err(|e| at("template", &e.without_input()))?,
            )
        }
        None => FileSource::Object {
            key,
            encoding: match encoding {
                None => Encoding::Utf8,
                Some(e) => Encoding::parse(&e).map_err(|e| at("encoding", &e.without_input()))?,
            },
        },
    };
    let spec = FileSpec {
        name,
        object,
        version: version.filter(|v| !v.is_empty()),
        params,
        mode,
        source,
    };
    Ok(match history {
        None => vec![spec],
        // Secrets Store's layout: a directory named for the file, `0` the newest version.
        Some(n) => {
            let encoding = match &spec.source {
                FileSource::Object { encoding, .. } => *encoding,
                _ => Encoding::Utf8,
            };
            (0..n)
                .map(|index| FileSpec {
                    name: FileName::in_dir(&spec.name, index),
                    source: FileSource::VersionOf { index, encoding },
                    ..spec.clone()
                })
                .collect()
        }
    })
}

/// Most versions one `objectVersionHistory` may ask for.
pub const MAX_VERSION_HISTORY: usize = 16;

/// The volume's files from `objects`, bounded by `limits` before each is parsed.
pub(super) fn content_of(
    ctx: &BTreeMap<String, String>,
    provider: ProviderKind,
    keyvault: Option<&str>,
    default_mode: u32,
    limits: Limits,
) -> Result<VolumeContent, RequestError> {
    let objects_text =
        attr(ctx, &["objects"]).ok_or_else(|| err("volume_context has no objects"))?;
    let raw = parse_objects(provider, objects_text)?;
    if raw.len() > limits.max_files {
        return Err(err(format!(
            "objects lists {} objects; at most {} are allowed",
            raw.len(),
            limits.max_files
        )));
    }
    let files = raw
        .into_iter()
        .enumerate()
        .map(|(i, o)| file_spec(provider, keyvault, default_mode, i, o))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    VolumeContent::new(files, limits).map_err(|e| err(format!("objects: {e}")))
}
