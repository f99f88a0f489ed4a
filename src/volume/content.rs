//! The volume content model, shared by every volume type.
//!
//! A volume is a flat set of files. Each file comes from one provider object: the whole value,
//! one key of a JSON value, or a template that renders several keys of one object into one file
//! (so a connection string's username and password always come from the same fetch/lease).
//! Everything here is validated once, when the config is parsed ([`FileName::parse`],
//! [`Template::parse`], [`Limits`]); rendering only reports what the *values* got wrong.
//!
//! What this module does not do: fetch, mount, or write anything.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use serde_json::Value;

use crate::provider::ObjectRequest;
use crate::secret::{SecretBytes, SecretJson, SecretObject};

/// Bounds on what one volume may hold. Every limit applies to input a pod or config controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Files in one volume (default 64).
    pub max_files: usize,
    /// Bytes of one object as fetched, and of one rendered file (default 1 MiB, the size limit
    /// of a Kubernetes Secret).
    pub max_object_bytes: usize,
    /// Bytes of all files of one volume together (default 8 MiB).
    pub max_volume_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 64,
            max_object_bytes: 1 << 20,
            max_volume_bytes: 8 << 20,
        }
    }
}

pub const MAX_NAME_BYTES: usize = 255;

/// A validated file name inside a volume: one path element, no traversal, not reserved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileName(String);

impl FileName {
    pub fn parse(name: &str) -> Result<Self, ContentError> {
        let bad = |rule: &'static str| ContentError::BadFileName {
            name: printable(name),
            rule,
        };
        if name.is_empty() {
            return Err(bad("must not be empty"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(bad("must be at most 255 bytes"));
        }
        if name.starts_with('/') {
            return Err(bad("must be relative, not an absolute path"));
        }
        if name == "." || name == ".." || name.split('/').any(|p| p == "..") {
            return Err(bad("must not contain '..' path elements"));
        }
        if name.contains('/') {
            return Err(bad("must be a single file name without '/'"));
        }
        if name.starts_with("..") {
            return Err(bad(
                "must not start with '..' (reserved for the volume layout)",
            ));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(bad("must not contain control characters"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name of version `index` of a versioned object, inside directory `dir`
    /// (`objectVersionHistory`: `dir/0` is the newest). Only keybroker makes these two-part
    /// names; a name from a pod is always one element.
    pub fn in_dir(dir: &FileName, index: usize) -> Self {
        Self(format!("{}/{index}", dir.0))
    }

    /// The directory part of a two-part name, and the last part.
    pub fn split(&self) -> (Option<&str>, &str) {
        match self.0.split_once('/') {
            Some((d, f)) => (Some(d), f),
            None => (None, &self.0),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the value is encoded at the provider. The file receives the decoded bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
    Hex,
}

impl Encoding {
    pub fn parse(s: &str) -> Result<Self, ContentError> {
        match s.to_ascii_lowercase().as_str() {
            "" | "utf-8" | "utf8" | "text" => Ok(Self::Utf8),
            "base64" => Ok(Self::Base64),
            "hex" => Ok(Self::Hex),
            _ => Err(ContentError::BadEncoding(printable(s))),
        }
    }
}

/// A parsed template: literal text and `{{ key }}` placeholders naming keys of one JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Key(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, ContentError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(ContentError::BadTemplate(
                "a '{{' has no matching '}}'".into(),
            ))?;
            let key = after[..end].trim();
            if key.is_empty() || key.contains("{{") {
                return Err(ContentError::BadTemplate(
                    "a placeholder must name a key, as in {{password}}".into(),
                ));
            }
            parts.push(Part::Key(key.to_owned()));
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(ContentError::BadTemplate(
                "a '}}' has no matching '{{'".into(),
            ));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Key(_))) {
            return Err(ContentError::BadTemplate(
                "a template needs at least one {{key}} placeholder".into(),
            ));
        }
        Ok(Self { parts })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Key(k) => Some(k.as_str()),
            Part::Literal(_) => None,
        })
    }
}

/// What one file is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    /// The object's value, or one key of it when it is a JSON object, decoded per `encoding`.
    Object {
        key: Option<String>,
        encoding: Encoding,
    },
    /// Keys of the object's JSON value rendered into a template.
    Template(Template),
    /// Version `index` (0 the newest) of an object fetched with its history: the value is a
    /// JSON array of the versions' values, newest first. No file when the object has fewer
    /// versions.
    VersionOf { index: usize, encoding: Encoding },
}

/// One file of a volume, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    pub name: FileName,
    /// Name of the object at the provider this file is made from.
    pub object: String,
    /// A pinned version of the object, if any (otherwise the latest).
    pub version: Option<String>,
    /// Provider request parameters ([`ObjectRequest::params`]).
    pub params: Option<String>,
    pub mode: u32,
    pub source: FileSource,
}

impl FileSpec {
    pub fn request(&self) -> ObjectRequest {
        ObjectRequest {
            name: self.object.clone(),
            version: self.version.clone(),
            params: self.params.clone(),
        }
    }
}

/// The whole content description of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeContent {
    pub files: Vec<FileSpec>,
    pub limits: Limits,
}

impl VolumeContent {
    /// Checks the rules that span files: count, duplicate names.
    pub fn new(files: Vec<FileSpec>, limits: Limits) -> Result<Self, ContentError> {
        if files.is_empty() {
            return Err(ContentError::NoFiles);
        }
        if files.len() > limits.max_files {
            return Err(ContentError::TooManyFiles {
                count: files.len(),
                max: limits.max_files,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &files {
            if !seen.insert(f.name.as_str().to_owned()) {
                return Err(ContentError::DuplicateFile(f.name.to_string()));
            }
        }
        // A directory of versions and a file of the same name cannot both exist.
        for f in &files {
            if let (Some(dir), _) = f.name.split()
                && seen.contains(dir)
            {
                return Err(ContentError::DuplicateFile(dir.to_owned()));
            }
        }
        Ok(Self { files, limits })
    }

    /// The distinct provider objects this volume needs, in a stable order.
    pub fn objects(&self) -> Vec<ObjectRequest> {
        let set: std::collections::BTreeSet<ObjectRequest> =
            self.files.iter().map(FileSpec::request).collect();
        set.into_iter().collect()
    }

    /// Renders every file from one consistent set of objects.
    ///
    /// The size limits are enforced *while* rendering: a file stops growing at
    /// `max_object_bytes` or at what is left of `max_volume_bytes`, whichever is smaller, so a
    /// template that names a large key thousands of times costs at most the limit in memory
    /// and time, never the size it would have rendered to.
    pub fn render(
        &self,
        objects: &BTreeMap<ObjectRequest, Arc<SecretObject>>,
    ) -> Result<Vec<RenderedFile>, ContentError> {
        let mut out = Vec::with_capacity(self.files.len());
        let mut total = 0usize;
        for spec in &self.files {
            let obj = objects
                .get(&spec.request())
                .ok_or_else(|| ContentError::MissingObject(spec.object.clone()))?;
            if obj.value.len() > self.limits.max_object_bytes {
                return Err(ContentError::TooLarge {
                    object: spec.object.clone(),
                    size: obj.value.len(),
                    max: self.limits.max_object_bytes,
                });
            }
            let left = self.limits.max_volume_bytes.saturating_sub(total);
            let budget = Budget {
                cap: self.limits.max_object_bytes.min(left),
                volume_bound: left < self.limits.max_object_bytes,
                max_object: self.limits.max_object_bytes,
                max_volume: self.limits.max_volume_bytes,
            };
            let Some(bytes) = render_one(spec, obj, &budget)? else {
                continue;
            };
            budget.check(spec, bytes.len())?;
            total += bytes.len();
            out.push(RenderedFile {
                name: spec.name.clone(),
                mode: spec.mode,
                bytes,
                object: spec.object.clone(),
                version: obj.version.clone(),
            });
        }
        Ok(out)
    }
}

/// How many bytes one file may still take, and which limit that is.
struct Budget {
    cap: usize,
    /// The cap comes from what is left of the volume limit (not the per-object limit).
    volume_bound: bool,
    max_object: usize,
    max_volume: usize,
}

impl Budget {
    fn check(&self, spec: &FileSpec, size: usize) -> Result<(), ContentError> {
        if size <= self.cap {
            return Ok(());
        }
        Err(if self.volume_bound {
            ContentError::VolumeTooLarge {
                max: self.max_volume,
            }
        } else {
            ContentError::FileTooLarge {
                file: spec.name.to_string(),
                object: spec.object.clone(),
                max: self.max_object,
            }
        })
    }
}

/// A file ready to be served: name, mode and the bytes (secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    pub name: FileName,
    pub mode: u32,
    pub bytes: SecretBytes,
    pub object: String,
    pub version: String,
}

#[cfg(test)]
impl RenderedFile {
    /// A file for tests of the volume types: `name` holding `value` with `mode`.
    pub fn for_test(name: &str, value: &str, mode: u32) -> Self {
        Self {
            name: FileName::parse(name).expect("valid test file name"),
            mode,
            bytes: SecretBytes::new(value.as_bytes().to_vec()),
            object: name.into(),
            version: value.into(),
        }
    }
}

fn parse_json_object(object: &str, value: &SecretBytes) -> Result<SecretJson, ContentError> {
    let v: Value = serde_json::from_slice(value.expose()).map_err(|_| ContentError::NotJson {
        object: object.to_owned(),
    })?;
    let v = SecretJson(v);
    if !v.0.is_object() {
        return Err(ContentError::NotJson {
            object: object.to_owned(),
        });
    }
    Ok(v)
}

fn json_field(object: &str, json: &SecretJson, key: &str) -> Result<SecretBytes, ContentError> {
    let mut out = Vec::new();
    append_field(object, json, key, &mut out, usize::MAX)?;
    Ok(SecretBytes::new(out))
}

/// Appends the text of `key` to `out`, refusing (before copying) to take `out` past `cap`.
/// `out` never reallocates past what was reserved for it, so no copy of a value is left behind
/// in freed memory.
fn append_field(
    object: &str,
    json: &SecretJson,
    key: &str,
    out: &mut Vec<u8>,
    cap: usize,
) -> Result<(), ContentError> {
    let over = || ContentError::Overflow;
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        if out.len() + bytes.len() > cap {
            return Err(over());
        }
        out.extend_from_slice(bytes);
        Ok(())
    };
    match json.0.get(key) {
        Some(Value::String(s)) => put(out, s.as_bytes()),
        Some(Value::Null) | None => Err(ContentError::MissingKey {
            object: object.to_owned(),
            key: key.to_owned(),
        }),
        // A list of strings (a PEM chain such as Vault PKI's `ca_chain`): one per line.
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    put(out, b"\n")?;
                }
                put(out, item.as_str().unwrap_or_default().as_bytes())?;
            }
            Ok(())
        }
        // Numbers, booleans and nested values are written as their JSON text.
        Some(other) => {
            let text = zeroize::Zeroizing::new(other.to_string().into_bytes());
            put(out, &text)
        }
    }
}

fn render_one(
    spec: &FileSpec,
    obj: &SecretObject,
    budget: &Budget,
) -> Result<Option<SecretBytes>, ContentError> {
    // Rendering stopped at the budget: report it as the limit that was hit.
    let bounded = |e: ContentError| match e {
        ContentError::Overflow => budget
            .check(spec, budget.cap.saturating_add(1))
            .unwrap_err(),
        e => e,
    };
    match &spec.source {
        FileSource::Object { key, encoding } => {
            let raw = match key {
                None => obj.value.clone(),
                Some(k) => {
                    let json = parse_json_object(&spec.object, &obj.value)?;
                    json_field(&spec.object, &json, k)?
                }
            };
            decode(&spec.object, *encoding, raw).map(Some)
        }
        FileSource::VersionOf { index, encoding } => {
            let versions: Vec<zeroize::Zeroizing<String>> =
                serde_json::from_slice(obj.value.expose()).map_err(|_| ContentError::NotJson {
                    object: spec.object.clone(),
                })?;
            match versions.get(*index) {
                None => Ok(None),
                Some(v) => decode(
                    &spec.object,
                    *encoding,
                    SecretBytes::new(v.as_bytes().to_vec()),
                )
                .map(Some),
            }
        }
        FileSource::Template(t) => {
            let json = parse_json_object(&spec.object, &obj.value)?;
            // The reservation is the most a file may hold, so the buffer never moves (no
            // stale copies of values in freed memory) and never grows past the limit.
            let mut out = zeroize::Zeroizing::new(Vec::with_capacity(
                budget.cap.min(obj.value.len().saturating_mul(2).max(4096)),
            ));
            for part in &t.parts {
                match part {
                    Part::Literal(s) => {
                        if out.len() + s.len() > budget.cap {
                            return Err(bounded(ContentError::Overflow));
                        }
                        out.extend_from_slice(s.as_bytes());
                    }
                    Part::Key(k) => append_field(&spec.object, &json, k, &mut out, budget.cap)
                        .map_err(bounded)?,
                }
            }
            Ok(Some(SecretBytes::new(std::mem::take(&mut *out))))
        }
    }
}

fn decode(object: &str, encoding: Encoding, raw: SecretBytes) -> Result<SecretBytes, ContentError> {
    let bad = || ContentError::BadValueEncoding {
        object: object.to_owned(),
        encoding,
    };
    match encoding {
        Encoding::Utf8 => Ok(raw),
        Encoding::Base64 => {
            let trimmed = raw.expose().trim_ascii();
            base64::engine::general_purpose::STANDARD
                .decode(trimmed)
                .map(SecretBytes::new)
                .map_err(|_| bad())
        }
        Encoding::Hex => hex::decode(raw.expose().trim_ascii())
            .map(SecretBytes::new)
            .map_err(|_| bad()),
    }
}

/// A name as it may be shown in an error: control characters escaped, long names cut.
fn printable(s: &str) -> String {
    let escaped: String = s.escape_debug().collect();
    if escaped.len() > 80 {
        let cut: String = escaped.chars().take(80).collect();
        format!("{cut}... ({} bytes)", s.len())
    } else {
        escaped
    }
}

/// Everything that can be wrong with volume content. Messages name the object or file and the
/// rule, never a value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ContentError {
    #[error("file name \"{name}\" is not allowed: it {rule}")]
    BadFileName { name: String, rule: &'static str },
    #[error("encoding \"{0}\" is not known: use utf-8, base64 or hex")]
    BadEncoding(String),
    #[error("template is not valid: {0}")]
    BadTemplate(String),
    #[error("the volume lists no files")]
    NoFiles,
    #[error("the volume has {count} files; at most {max} are allowed (limits.maxFiles)")]
    TooManyFiles { count: usize, max: usize },
    #[error("file name \"{0}\" is used twice")]
    DuplicateFile(String),
    #[error("object \"{0}\" was not fetched")]
    MissingObject(String),
    #[error(
        "object \"{object}\" is {size} bytes; at most {max} are allowed (limits.maxObjectBytes)"
    )]
    TooLarge {
        object: String,
        size: usize,
        max: usize,
    },
    #[error("the volume's files together exceed {max} bytes (limits.maxVolumeBytes)")]
    VolumeTooLarge { max: usize },
    #[error(
        "file \"{file}\" (object \"{object}\") renders to more than {max} bytes (limits.maxObjectBytes)"
    )]
    FileTooLarge {
        file: String,
        object: String,
        max: usize,
    },
    /// Internal to rendering: a file reached its byte budget (reported as one of the above).
    #[error("the rendered file reached its size limit")]
    Overflow,
    #[error(
        "object \"{object}\" is not a JSON object, so a key or template cannot be read from it"
    )]
    NotJson { object: String },
    #[error("object \"{object}\" has no key \"{key}\"")]
    MissingKey { object: String, key: String },
    #[error("object \"{object}\" is not valid {encoding:?} as its encoding says")]
    BadValueEncoding { object: String, encoding: Encoding },
}

impl ContentError {
    /// The rule that was broken, without the input that broke it (for errors about text a pod
    /// wrote, which must not reach logs).
    pub fn without_input(&self) -> String {
        match self {
            Self::BadFileName { rule, .. } => format!("is not allowed: it {rule}"),
            Self::BadEncoding(_) => "is not known: use utf-8, base64 or hex".into(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: &str) -> Arc<SecretObject> {
        Arc::new(SecretObject {
            value: SecretBytes::new(v.as_bytes().to_vec()),
            version: "1".into(),
            content_type: None,
            expiry: None,
            lease: None,
        })
    }

    fn req(name: &str) -> ObjectRequest {
        ObjectRequest {
            name: name.into(),
            version: None,
            params: None,
        }
    }

    fn spec(name: &str, object: &str, source: FileSource) -> FileSpec {
        FileSpec {
            name: FileName::parse(name).unwrap(),
            object: object.into(),
            version: None,
            params: None,
            mode: 0o440,
            source,
        }
    }

    #[test]
    fn hostile_names_are_rejected_with_the_rule() {
        let long = "a".repeat(256);
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("..", "'..'"),
            ("a/../b", "'..'"),
            ("a/b", "'/'"),
            ("..data", "reserved"),
            ("a\nb", "control"),
            (long.as_str(), "255"),
        ];
        for (name, rule) in cases {
            let err = FileName::parse(name).unwrap_err().to_string();
            assert!(err.contains(rule), "{name:?}: {err}");
        }
        assert_eq!(FileName::parse("tls.crt").unwrap().as_str(), "tls.crt");
        assert!(FileName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn templates_parse_and_reject_malformed() {
        let t = Template::parse("postgresql://{{username}}:{{ password }}@db:5432/app").unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["username", "password"]);
        for bad in ["{{username", "user}}", "no placeholders", "{{}}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_whole_key_encoded_and_template() {
        let content = VolumeContent::new(
            vec![
                spec(
                    "plain",
                    "p",
                    FileSource::Object {
                        key: None,
                        encoding: Encoding::Utf8,
                    },
                ),
                spec(
                    "b64",
                    "b",
                    FileSource::Object {
                        key: None,
                        encoding: Encoding::Base64,
                    },
                ),
                spec(
                    "hex",
                    "h",
                    FileSource::Object {
                        key: None,
                        encoding: Encoding::Hex,
                    },
                ),
                spec(
                    "user",
                    "db",
                    FileSource::Object {
                        key: Some("username".into()),
                        encoding: Encoding::Utf8,
                    },
                ),
                spec(
                    "port",
                    "db",
                    FileSource::Object {
                        key: Some("port".into()),
                        encoding: Encoding::Utf8,
                    },
                ),
                spec(
                    "url",
                    "db",
                    FileSource::Template(
                        Template::parse("postgresql://{{username}}:{{password}}@db:{{port}}/app")
                            .unwrap(),
                    ),
                ),
            ],
            Limits::default(),
        )
        .unwrap();
        let mut objects = BTreeMap::new();
        objects.insert(req("p"), obj("plain-value"));
        objects.insert(req("b"), obj("aGVsbG8=\n"));
        objects.insert(req("h"), obj("776f726c64"));
        objects.insert(
            req("db"),
            obj(r#"{"username":"app","password":"s3cr3t","port":5432}"#),
        );
        let files = content.render(&objects).unwrap();
        let got: Vec<(&str, &[u8])> = files
            .iter()
            .map(|f| (f.name.as_str(), f.bytes.expose()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("plain", &b"plain-value"[..]),
                ("b64", b"hello"),
                ("hex", b"world"),
                ("user", b"app"),
                ("port", b"5432"),
                ("url", b"postgresql://app:s3cr3t@db:5432/app"),
            ]
        );
        assert_eq!(
            content
                .objects()
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            ["b", "db", "h", "p"]
        );
    }

    #[test]
    fn value_errors_name_the_object_never_the_value() {
        let content = VolumeContent::new(
            vec![spec(
                "f",
                "o",
                FileSource::Object {
                    key: Some("k".into()),
                    encoding: Encoding::Utf8,
                },
            )],
            Limits::default(),
        )
        .unwrap();
        let mut objects = BTreeMap::new();
        objects.insert(req("o"), obj("top-secret-not-json"));
        let err = content.render(&objects).unwrap_err().to_string();
        assert!(
            err.contains("\"o\"") && !err.contains("top-secret"),
            "{err}"
        );

        objects.insert(req("o"), obj(r#"{"other":"top-secret"}"#));
        let err = content.render(&objects).unwrap_err().to_string();
        assert!(
            err.contains("no key \"k\"") && !err.contains("top-secret"),
            "{err}"
        );

        let content = VolumeContent::new(
            vec![spec(
                "f",
                "o",
                FileSource::Object {
                    key: None,
                    encoding: Encoding::Base64,
                },
            )],
            Limits::default(),
        )
        .unwrap();
        objects.insert(req("o"), obj("top-secret!!"));
        let err = content.render(&objects).unwrap_err().to_string();
        assert!(
            err.contains("Base64") && !err.contains("top-secret"),
            "{err}"
        );
    }

    #[test]
    fn a_template_bomb_stops_at_the_limit() {
        let big = "x".repeat(1000 << 10);
        let value = format!(r#"{{"k":"{big}"}}"#);
        let bomb = "{{k}}".repeat(4000);
        let content = VolumeContent::new(
            vec![spec(
                "f",
                "o",
                FileSource::Template(Template::parse(&bomb).unwrap()),
            )],
            Limits::default(),
        )
        .unwrap();
        let mut objects = BTreeMap::new();
        objects.insert(req("o"), obj(&value));
        let err = content.render(&objects).unwrap_err();
        assert_eq!(
            err,
            ContentError::FileTooLarge {
                file: "f".into(),
                object: "o".into(),
                max: 1 << 20
            }
        );
        // Under the object limit but over what is left of the volume: the volume limit.
        let limits = Limits {
            max_files: 2,
            max_object_bytes: 100,
            max_volume_bytes: 150,
        };
        let content = VolumeContent::new(
            vec![
                spec(
                    "a",
                    "o",
                    FileSource::Template(Template::parse("{{k}}{{k}}").unwrap()),
                ),
                spec(
                    "b",
                    "o",
                    FileSource::Template(Template::parse("{{k}}{{k}}").unwrap()),
                ),
            ],
            limits,
        )
        .unwrap();
        objects.insert(req("o"), obj(&format!(r#"{{"k":"{}"}}"#, "y".repeat(40))));
        assert_eq!(
            content.render(&objects).unwrap_err(),
            ContentError::VolumeTooLarge { max: 150 }
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_files: 1,
            max_object_bytes: 4,
            max_volume_bytes: 6,
        };
        let two = vec![
            spec(
                "a",
                "a",
                FileSource::Object {
                    key: None,
                    encoding: Encoding::Utf8,
                },
            ),
            spec(
                "b",
                "b",
                FileSource::Object {
                    key: None,
                    encoding: Encoding::Utf8,
                },
            ),
        ];
        assert!(matches!(
            VolumeContent::new(two.clone(), limits),
            Err(ContentError::TooManyFiles { count: 2, max: 1 })
        ));
        let dup = vec![two[0].clone(), two[0].clone()];
        assert!(matches!(
            VolumeContent::new(dup, Limits::default()),
            Err(ContentError::DuplicateFile(_))
        ));
        let limits = Limits {
            max_files: 2,
            ..limits
        };
        let content = VolumeContent::new(two, limits).unwrap();
        let mut objects = BTreeMap::new();
        objects.insert(req("a"), obj("12345"));
        objects.insert(req("b"), obj("1"));
        assert!(matches!(
            content.render(&objects),
            Err(ContentError::TooLarge { size: 5, .. })
        ));
        objects.insert(req("a"), obj("1234"));
        objects.insert(req("b"), obj("1234"));
        assert!(matches!(
            content.render(&objects),
            Err(ContentError::VolumeTooLarge { max: 6 })
        ));
    }
}

/// File names from pods, over arbitrary strings: whatever is accepted stays one element
/// directly inside the volume.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    proptest! {
        #[test]
        fn an_accepted_name_is_one_plain_element_inside_the_volume(
            name in prop_oneof!["[a-z./\\\\-]{0,8}", ".{0,300}", "\\PC{250,260}"],
        ) {
            if let Ok(f) = FileName::parse(&name) {
                let base = Path::new("/volume");
                let joined = base.join(f.as_str());
                prop_assert_eq!(joined.parent(), Some(base));
                let comps: Vec<Component> = Path::new(f.as_str()).components().collect();
                prop_assert_eq!(comps.len(), 1);
                prop_assert!(matches!(comps[0], Component::Normal(_)));
                prop_assert!(!f.as_str().starts_with(".."));
                prop_assert!(f.as_str().len() <= MAX_NAME_BYTES);
                prop_assert!(!f.as_str().chars().any(char::is_control));
            }
        }
    }
}
