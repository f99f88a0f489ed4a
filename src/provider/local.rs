//! The `local` provider: secrets from this machine, for development and demos only.
//!
//! Two shapes of source:
//! - a directory: each regular file is one object, named by its file name;
//! - a YAML file: a mapping of object name to a string (the value) or to a mapping (served as a
//!   JSON object, so `key:` and templates can pick fields from it).
//!
//! The source is watched (inotify on the directory, or on the YAML file's directory since
//! editors replace files by rename) and every change ticks [`Provider::changes`].
//! Values read here pass through ordinary heap buffers of the YAML parser; the local provider is
//! not meant for production secrets and says so when it starts.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::{BoxFuture, ObjectRequest, Provider, ProviderError};
use crate::secret::{SecretBytes, SecretObject};
use crate::volume::content::FileName;

const KIND: &str = "local";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Dir(PathBuf),
    Yaml(PathBuf),
}

pub struct LocalProvider {
    source: Source,
    max_bytes: usize,
    changes: watch::Receiver<u64>,
    // Kept alive for as long as the provider: dropping the watcher stops the watch.
    _watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    /// Opens a directory or YAML file of secrets and starts watching it.
    pub fn open(path: &Path, max_bytes: usize) -> Result<Self, LocalError> {
        let meta = std::fs::metadata(path).map_err(|e| LocalError::Open {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
        let source = if meta.is_dir() {
            Source::Dir(path.to_owned())
        } else {
            let is_yaml = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if !is_yaml {
                return Err(LocalError::Shape(path.to_owned()));
            }
            Source::Yaml(path.to_owned())
        };
        let (tx, rx) = watch::channel(0u64);
        let watch_dir = match &source {
            Source::Dir(d) => d.clone(),
            Source::Yaml(f) => f
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                tx.send_modify(|n| *n += 1);
            }
        })
        .map_err(|e| LocalError::Watch(e.to_string()))?;
        watcher
            .watch(&watch_dir, RecursiveMode::NonRecursive)
            .map_err(|e| LocalError::Watch(e.to_string()))?;
        tracing::warn!(
            source = %path.display(),
            "the local provider is for development only: its secrets come from files on this machine"
        );
        Ok(Self {
            source,
            max_bytes,
            changes: rx,
            _watcher: Mutex::new(Some(watcher)),
        })
    }

    fn read_capped(&self, path: &Path, object: &str) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::NotFound {
                provider: KIND,
                object: object.to_owned(),
            },
            std::io::ErrorKind::PermissionDenied => ProviderError::PermissionDenied {
                provider: KIND,
                object: object.to_owned(),
                code: "local-file-unreadable".into(),
                detail: format!("cannot read {}", path.display()),
            },
            _ => ProviderError::Unavailable {
                provider: KIND,
                detail: format!("cannot read {}: {e}", path.display()),
            },
        })?;
        let mut buf = Zeroizing::new(Vec::new());
        // Read one byte past the limit so an oversized file is refused, not truncated.
        file.take(self.max_bytes as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ProviderError::Unavailable {
                provider: KIND,
                detail: format!("cannot read {}: {e}", path.display()),
            })?;
        if buf.len() > self.max_bytes {
            return Err(ProviderError::Invalid {
                provider: KIND,
                object: object.to_owned(),
                detail: format!(
                    "larger than {} bytes (limits.maxObjectBytes)",
                    self.max_bytes
                ),
            });
        }
        Ok(buf)
    }

    fn fetch_sync(&self, req: &ObjectRequest) -> Result<SecretObject, ProviderError> {
        let invalid = |detail: String| ProviderError::Invalid {
            provider: KIND,
            object: req.name.clone(),
            detail,
        };
        let value = match &self.source {
            Source::Dir(dir) => {
                // Object names come from config or pods: one path element, nothing else.
                let name = FileName::parse(&req.name).map_err(|e| invalid(e.to_string()))?;
                let path = dir.join(name.as_str());
                let meta =
                    std::fs::symlink_metadata(&path).map_err(|_| ProviderError::NotFound {
                        provider: KIND,
                        object: req.name.clone(),
                    })?;
                if !meta.is_file() {
                    return Err(invalid("not a regular file".into()));
                }
                SecretBytes::new(std::mem::take(&mut *self.read_capped(&path, &req.name)?))
            }
            Source::Yaml(file) => {
                let raw = self.read_capped(file, &req.name)?;
                let doc: BTreeMap<String, serde_norway::Value> = serde_norway::from_slice(&raw)
                    .map_err(|e| ProviderError::Unavailable {
                        provider: KIND,
                        // Only the location: the parser's message quotes the offending value,
                        // which may be a secret.
                        detail: format!(
                            "{} is not a YAML mapping of name to value{}",
                            file.display(),
                            e.location()
                                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                                .unwrap_or_default()
                        ),
                    })?;
                let v = doc.get(&req.name).ok_or_else(|| ProviderError::NotFound {
                    provider: KIND,
                    object: req.name.clone(),
                })?;
                match v {
                    serde_norway::Value::String(s) => SecretBytes::new(s.as_bytes().to_vec()),
                    serde_norway::Value::Number(n) => SecretBytes::new(n.to_string().into_bytes()),
                    serde_norway::Value::Bool(b) => SecretBytes::new(b.to_string().into_bytes()),
                    serde_norway::Value::Mapping(_) => {
                        let json = serde_json::to_vec(v).map_err(|_| {
                            invalid("a mapping that cannot be written as JSON".into())
                        })?;
                        SecretBytes::new(json)
                    }
                    _ => return Err(invalid("must be a string or a mapping".into())),
                }
            }
        };
        if let Some(want) = &req.version
            && *want != value.fingerprint()
        {
            return Err(ProviderError::NotFound {
                provider: KIND,
                object: format!("{}@{want}", req.name),
            });
        }
        let version = value.fingerprint();
        Ok(SecretObject {
            value,
            version,
            content_type: None,
            expiry: None,
            lease: None,
        })
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn fetch<'a>(
        &'a self,
        req: &'a ObjectRequest,
    ) -> BoxFuture<'a, Result<SecretObject, ProviderError>> {
        Box::pin(async move { self.fetch_sync(req) })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot open the local secrets source {path}: {error}")]
    Open { path: PathBuf, error: String },
    #[error("the local secrets source {0} must be a directory or a .yaml/.yml file")]
    Shape(PathBuf),
    #[error("cannot watch the local secrets source: {0}")]
    Watch(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str) -> ObjectRequest {
        ObjectRequest {
            name: name.into(),
            version: None,
            params: None,
        }
    }

    #[tokio::test]
    async fn directory_source_reads_files_and_refuses_traversal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-key"), b"k1").unwrap();
        let p = LocalProvider::open(dir.path(), 16).unwrap();
        let got = p.fetch(&req("api-key")).await.unwrap();
        assert_eq!(got.value.expose(), b"k1");
        assert!(matches!(
            p.fetch(&req("missing")).await,
            Err(ProviderError::NotFound { .. })
        ));
        assert!(matches!(
            p.fetch(&req("../etc/passwd")).await,
            Err(ProviderError::Invalid { .. })
        ));
        std::fs::write(dir.path().join("big"), vec![b'x'; 17]).unwrap();
        assert!(matches!(
            p.fetch(&req("big")).await,
            Err(ProviderError::Invalid { .. })
        ));
    }

    #[tokio::test]
    async fn yaml_source_serves_strings_and_mappings_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.yaml");
        std::fs::write(&f, "token: abc\ndb:\n  username: app\n  password: pw\n").unwrap();
        let p = LocalProvider::open(&f, 1024).unwrap();
        assert_eq!(p.fetch(&req("token")).await.unwrap().value.expose(), b"abc");
        let db = p.fetch(&req("db")).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(db.value.expose()).unwrap();
        assert_eq!(v["username"], "app");
    }

    #[tokio::test]
    async fn a_malformed_yaml_source_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.yaml");
        std::fs::write(&f, "hunter2-top-secret\n").unwrap();
        let p = LocalProvider::open(&f, 1024).unwrap();
        let err = p.fetch(&req("a")).await.unwrap_err().to_string();
        assert!(
            err.contains("not a YAML mapping") && err.contains("line 1"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn version_changes_with_content_and_changes_tick() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"one").unwrap();
        let p = LocalProvider::open(dir.path(), 16).unwrap();
        let mut rx = p.changes().unwrap();
        let v1 = p.fetch(&req("a")).await.unwrap().version;
        std::fs::write(dir.path().join("a"), b"two").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .expect("a change is reported")
            .unwrap();
        let v2 = p.fetch(&req("a")).await.unwrap().version;
        assert_ne!(v1, v2);
    }
}
