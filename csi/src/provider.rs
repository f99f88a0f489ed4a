//! The Secrets Store CSI driver's provider API (`v1alpha1.CSIDriverProvider`) as a thin edge:
//! the driver's JSON strings are parsed and bounded here into plain types for a
//! [`SecretsProvider`]; its answer becomes a `MountResponse`. No protobuf type crosses.
//!
//! Facts of the driver this edge follows: `attributes` is a JSON map of strings (the
//! SecretProviderClass parameters overwritten by the pod's volume attributes, plus the pod info
//! keys); `secrets` a JSON map of the nodePublishSecretRef (the JSON `null` when the class has
//! none: the driver marshals a nil Go map); `permission` the default file mode
//! as a decimal JSON number in a string; the response must list an object version for every
//! object, and `error.code` is what the driver shows in the pod's events.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::authority::AuthorityRepair;
use crate::provider_pb as pb;
use crate::{MAX_MAP_BYTES, MAX_MAP_ENTRIES, Secrets};

/// The API version this edge speaks.
pub const API_VERSION: &str = "v1alpha1";
/// Largest `attributes` or `secrets` JSON accepted from the driver.
pub const MAX_JSON_BYTES: usize = MAX_MAP_BYTES + 64 * 1024;

/// One Mount, parsed and bounded.
pub struct MountRequest {
    /// Parameters and pod info (pod-author input except the pod info keys, which are the
    /// driver's attestation).
    pub attributes: BTreeMap<String, String>,
    pub secrets: Secrets,
    pub target_path: PathBuf,
    /// Default mode of the files.
    pub permission: u32,
}

impl std::fmt::Debug for MountRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountRequest")
            .field(
                "attribute_keys",
                &self.attributes.keys().collect::<Vec<_>>(),
            )
            .field("secrets", &self.secrets)
            .field("target_path", &self.target_path)
            .field("permission", &format_args!("{:o}", self.permission))
            .finish()
    }
}

/// A file for the driver to write.
pub struct MountedFile {
    /// Relative, clean, no `..`.
    pub path: String,
    pub mode: u32,
    /// Zeroized when dropped; the copy in the protobuf response and tonic's encode buffers
    /// are not (known gap, docs/SECURITY.md).
    pub contents: zeroize::Zeroizing<Vec<u8>>,
}

/// What a Mount gives the driver.
pub struct Mounted {
    /// (object id, version), one per object.
    pub versions: Vec<(String, String)>,
    pub files: Vec<MountedFile>,
}

/// Why a Mount gave no files: a short code for the driver's pod event, and the full reason for
/// keybroker's own log and audit (already recorded by the implementation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRefused {
    pub code: String,
}

/// What keybroker implements behind the provider API.
pub trait SecretsProvider: Send + Sync + 'static {
    fn mount(
        &self,
        req: MountRequest,
    ) -> impl Future<Output = Result<Mounted, MountRefused>> + Send;

    /// A Mount this edge refused before [`SecretsProvider::mount`] (its JSON or target path
    /// did not parse): the implementation logs and audits it like any other refusal.
    /// `target_path` is the driver's, cut to a bounded length; `reason` never holds request
    /// text.
    fn refused(&self, target_path: &str, reason: &str);

    /// Called once the socket is bound and accepting calls.
    fn serving(&self) {}
}

fn json_map(what: &str, text: &str) -> Result<BTreeMap<String, String>, String> {
    if text.len() > MAX_JSON_BYTES {
        return Err(format!("{what} is larger than {MAX_JSON_BYTES} bytes"));
    }
    // `null` is the driver's "none" (Go's json.Marshal of a nil map), as is an empty text.
    if matches!(text.trim(), "" | "null") {
        return Ok(BTreeMap::new());
    }
    let map: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|_| format!("{what} is not a JSON map of strings"))?;
    if map.len() > MAX_MAP_ENTRIES * 2 {
        return Err(format!(
            "{what} has more than {} entries",
            MAX_MAP_ENTRIES * 2
        ));
    }
    Ok(map)
}

/// The `permission` field: a decimal number (the driver marshals a Go `os.FileMode`), only
/// permission bits.
fn permission(text: &str) -> Result<u32, String> {
    let t = text.trim().trim_matches('"');
    if t.is_empty() {
        return Ok(0o644);
    }
    let n: u32 = t
        .parse()
        .map_err(|_| "permission is not a decimal file mode".to_string())?;
    if n & !0o777 != 0 {
        return Err(
            "permission may only hold permission bits (no setuid, setgid or sticky)".into(),
        );
    }
    Ok(n)
}

/// Parses and bounds a Mount.
pub fn parse(req: pb::MountRequest) -> Result<MountRequest, String> {
    let attributes = json_map("attributes", &req.attributes)?;
    let secrets = json_map("secrets", &req.secrets)?;
    let target = Path::new(&req.target_path);
    if req.target_path.len() > crate::MAX_ID_BYTES
        || !target.is_absolute()
        || target
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err("target_path must be an absolute path without '..'".into());
    }
    Ok(MountRequest {
        attributes,
        secrets: Secrets(
            secrets
                .into_iter()
                .map(|(k, v)| (k, zeroize::Zeroizing::new(v)))
                .collect(),
        ),
        target_path: target.to_owned(),
        permission: permission(&req.permission)?,
    })
}

/// Checks a file path before the driver writes it: relative, clean, components ≤ 255 bytes.
pub fn check_file_path(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(n) if n.len() <= 255))
}

struct Svc<P> {
    provider: Arc<P>,
}

#[tonic::async_trait]
impl<P: SecretsProvider> pb::csi_driver_provider_server::CsiDriverProvider for Svc<P> {
    async fn version(
        &self,
        _req: tonic::Request<pb::VersionRequest>,
    ) -> Result<tonic::Response<pb::VersionResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::VersionResponse {
            version: API_VERSION.into(),
            runtime_name: "keybroker".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn mount(
        &self,
        req: tonic::Request<pb::MountRequest>,
    ) -> Result<tonic::Response<pb::MountResponse>, tonic::Status> {
        let req = req.into_inner();
        let target: String = req.target_path.chars().take(crate::MAX_ID_BYTES).collect();
        let req = match parse(req) {
            Ok(r) => r,
            Err(reason) => {
                self.provider.refused(&target, &reason);
                return Err(tonic::Status::invalid_argument(reason));
            }
        };
        let resp = match self.provider.mount(req).await {
            Err(MountRefused { code }) => pb::MountResponse {
                object_version: vec![],
                error: Some(pb::Error { code }),
                files: vec![],
            },
            Ok(m) => {
                if let Some(bad) = m.files.iter().find(|f| !check_file_path(&f.path)) {
                    return Err(tonic::Status::internal(format!(
                        "refusing to hand the driver an unsafe file path {:?}",
                        bad.path
                    )));
                }
                pb::MountResponse {
                    object_version: m
                        .versions
                        .into_iter()
                        .map(|(id, version)| pb::ObjectVersion { id, version })
                        .collect(),
                    error: None,
                    files: m
                        .files
                        .into_iter()
                        .map(|f| pb::File {
                            path: f.path,
                            mode: (f.mode & 0o777) as i32,
                            contents: f.contents.to_vec(),
                        })
                        .collect(),
                }
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

/// Serves the provider API on the unix socket at `endpoint` until `shutdown`.
pub async fn serve<P: SecretsProvider>(
    endpoint: &str,
    provider: Arc<P>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (path, listener) = crate::server::bind_socket(endpoint).await?;
    provider.serving();
    tonic::transport::Server::builder()
        .add_service(pb::csi_driver_provider_server::CsiDriverProviderServer::new(Svc { provider }))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityRepair::new)),
            shutdown,
        )
        .await?;
    path.remove_if_ours();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_is_a_decimal_mode() {
        assert_eq!(permission("420").unwrap(), 0o644);
        assert_eq!(permission("\"292\"").unwrap(), 0o444);
        assert_eq!(permission("").unwrap(), 0o644);
        assert!(permission("0644x").is_err());
        assert!(permission("2541").is_err(), "setuid bit");
    }

    #[test]
    fn maps_are_bounded_and_typed() {
        assert!(json_map("attributes", r#"{"a":"b"}"#).is_ok());
        // What driver v1.6.0 sends for a class without nodePublishSecretRef.
        for none in ["null", " null\n", "{}", ""] {
            assert!(json_map("secrets", none).unwrap().is_empty(), "{none:?}");
        }
        for bad in ["[]", "nul", "\"x\"", "{\"a\":null}"] {
            assert!(json_map("secrets", bad).is_err(), "{bad:?}");
        }
        assert!(json_map("attributes", r#"{"a":1}"#).is_err());
        assert!(json_map("attributes", &"x".repeat(MAX_JSON_BYTES + 1)).is_err());
        let many: BTreeMap<String, String> =
            (0..200).map(|i| (i.to_string(), String::new())).collect();
        assert!(json_map("attributes", &serde_json::to_string(&many).unwrap()).is_err());
    }

    #[test]
    fn file_paths_are_relative_and_clean() {
        for ok in ["a", "db/0", "tls.crt"] {
            assert!(check_file_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../b", "./a", &"x".repeat(256)] {
            assert!(!check_file_path(bad), "{bad}");
        }
    }
}
