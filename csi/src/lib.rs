//! The CSI edge: kubelet's gRPC calls on a unix socket, turned into plain requests for a
//! [`NodePlugin`]. This crate knows the CSI protocol and nothing of keybroker's broker logic;
//! keybroker implements [`NodePlugin`].
//!
//! Validation here is the CSI part, in the order the spec's error tables give: `volume_id`,
//! then `target_path`, then `volume_capability` (each InvalidArgument), plus bounds on the size
//! of everything a pod can put in a request. `volume_context` and `secrets` are handed on
//! unlogged; `secrets` only inside a type whose `Debug` is redacted.

pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("csi.v1");
}

/// keybroker's broker API (`keybroker.v1.Broker`).
pub mod broker_pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("keybroker.v1");
}

/// The Secrets Store CSI driver's provider API (`v1alpha1.CSIDriverProvider`).
pub mod provider_pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("v1alpha1");
}

/// kubelet's plugin registration API (`pluginregistration.Registration`).
pub mod registration_pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("pluginregistration");
}

pub mod authority;
pub mod broker;
pub mod provider;
pub mod registration;
mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Component, Path, PathBuf};

pub use server::{BoundSocket, bind_socket, connect_unix, serve, serve_on, socket_path};

/// The driver name kubelet knows this plugin by (CSIDriver metadata.name).
pub const DRIVER_NAME: &str = "csi.keybroker.io";

/// At most this many entries in `volume_context` or `secrets`.
pub const MAX_MAP_ENTRIES: usize = 64;
/// At most this many bytes in all keys and values of `volume_context` together (same for `secrets`).
pub const MAX_MAP_BYTES: usize = 256 * 1024;
/// Longest accepted `volume_id` and `target_path`.
pub const MAX_ID_BYTES: usize = 4096;

/// String values kubelet sends as secrets (service-account tokens). Zeroized on drop, never shown.
#[derive(Default, Clone)]
pub struct Secrets(BTreeMap<String, zeroize::Zeroizing<String>>);

impl Secrets {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(|k| format!("{k}=<redacted>")))
            .finish()
    }
}

impl From<std::collections::HashMap<String, String>> for Secrets {
    fn from(m: std::collections::HashMap<String, String>) -> Self {
        Self(
            m.into_iter()
                .map(|(k, v)| (k, zeroize::Zeroizing::new(v)))
                .collect(),
        )
    }
}

/// A NodePublishVolume call, CSI-valid.
pub struct PublishRequest {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub readonly: bool,
    /// Pod information and volume attributes: pod-author input, never an authorization.
    pub volume_context: BTreeMap<String, String>,
    pub secrets: Secrets,
}

impl std::fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // volume_context can carry tokens on older kubelets: show its keys only.
        f.debug_struct("PublishRequest")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("readonly", &self.readonly)
            .field(
                "volume_context_keys",
                &self.volume_context.keys().collect::<Vec<_>>(),
            )
            .field("secrets", &self.secrets)
            .finish()
    }
}

/// A NodeUnpublishVolume call, CSI-valid.
#[derive(Debug)]
pub struct UnpublishRequest {
    pub volume_id: String,
    pub target_path: PathBuf,
}

/// Why a node call failed. Mapped to a gRPC status in exactly one place ([`status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

/// The one place a [`NodeError`] becomes a gRPC status.
pub fn status(e: NodeError) -> tonic::Status {
    match e {
        NodeError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
        NodeError::NotFound(m) => tonic::Status::not_found(m),
        NodeError::AlreadyExists(m) => tonic::Status::already_exists(m),
        NodeError::PermissionDenied(m) => tonic::Status::permission_denied(m),
        NodeError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
        NodeError::Unavailable(m) => tonic::Status::unavailable(m),
        NodeError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
        NodeError::Internal(m) => tonic::Status::internal(m),
    }
}

/// What keybroker implements behind the CSI socket.
pub trait NodePlugin: Send + Sync + 'static {
    fn node_id(&self) -> String;
    /// Ready to serve (bindings loaded, state recovered, the socket accepting calls).
    fn ready(&self) -> bool;
    /// Called once the socket is bound and accepting calls.
    fn serving(&self) {}
    fn publish(&self, req: PublishRequest) -> impl Future<Output = Result<(), NodeError>> + Send;
    fn unpublish(
        &self,
        req: UnpublishRequest,
    ) -> impl Future<Output = Result<(), NodeError>> + Send;
}

fn check_id(field: &str, v: &str) -> Result<(), NodeError> {
    if v.is_empty() {
        return Err(NodeError::InvalidArgument(format!("{field} is required")));
    }
    if v.len() > MAX_ID_BYTES || v.chars().any(char::is_control) {
        return Err(NodeError::InvalidArgument(format!(
            "{field} must be at most {MAX_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_target(v: &str) -> Result<PathBuf, NodeError> {
    check_id("target_path", v)?;
    let p = Path::new(v);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(NodeError::InvalidArgument(
            "target_path must be an absolute path without '..'".into(),
        ));
    }
    // Kernel interfaces are never volume targets (a mount over /proc/<pid>/... or /dev hides
    // what the node relies on).
    if ["/proc", "/sys", "/dev"].iter().any(|d| p.starts_with(d)) {
        return Err(NodeError::InvalidArgument(format!(
            "target_path {} is under /proc, /sys or /dev: not a volume target",
            p.display()
        )));
    }
    Ok(p.to_owned())
}

fn check_map<V: AsRef<str>>(
    field: &str,
    m: &std::collections::HashMap<String, V>,
) -> Result<(), NodeError> {
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.as_ref().len()).sum();
    if m.len() > MAX_MAP_ENTRIES || bytes > MAX_MAP_BYTES {
        return Err(NodeError::InvalidArgument(format!(
            "{field} is too large: at most {MAX_MAP_ENTRIES} entries and {MAX_MAP_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Parses a NodePublishVolume request in the spec's validation order.
pub fn parse_publish(r: pb::NodePublishVolumeRequest) -> Result<PublishRequest, NodeError> {
    check_id("volume_id", &r.volume_id)?;
    let target_path = check_target(&r.target_path)?;
    let cap = r
        .volume_capability
        .ok_or_else(|| NodeError::InvalidArgument("volume_capability is required".into()))?;
    match cap.access_type {
        Some(pb::volume_capability::AccessType::Mount(_)) => {}
        Some(pb::volume_capability::AccessType::Block(_)) => {
            return Err(NodeError::InvalidArgument(
                "block volumes are not supported: keybroker volumes are filesystems".into(),
            ));
        }
        None => {
            return Err(NodeError::InvalidArgument(
                "volume_capability.access_type is required".into(),
            ));
        }
    }
    if cap.access_mode.is_none() {
        return Err(NodeError::InvalidArgument(
            "volume_capability.access_mode is required".into(),
        ));
    }
    check_map("volume_context", &r.volume_context)?;
    check_map("secrets", &r.secrets)?;
    Ok(PublishRequest {
        volume_id: r.volume_id,
        target_path,
        readonly: r.readonly,
        volume_context: r.volume_context.into_iter().collect(),
        secrets: r.secrets.into(),
    })
}

/// Parses a NodeUnpublishVolume request in the spec's validation order.
pub fn parse_unpublish(r: pb::NodeUnpublishVolumeRequest) -> Result<UnpublishRequest, NodeError> {
    check_id("volume_id", &r.volume_id)?;
    let target_path = check_target(&r.target_path)?;
    Ok(UnpublishRequest {
        volume_id: r.volume_id,
        target_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
        }
    }

    #[test]
    fn publish_validation_follows_the_spec_order() {
        let mut r = pb::NodePublishVolumeRequest::default();
        assert_eq!(
            parse_publish(r.clone()).err(),
            Some(NodeError::InvalidArgument("volume_id is required".into()))
        );
        r.volume_id = "v".into();
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("target_path"))
        );
        r.target_path = "relative/path".into();
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("absolute"))
        );
        r.target_path = "/var/lib/kubelet/../../etc".into();
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("'..'"))
        );
        for kernel in ["/proc/1/fdinfo", "/sys/fs/x", "/dev/shm/x"] {
            r.target_path = kernel.into();
            assert!(
                matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("/proc, /sys or /dev")),
                "{kernel}"
            );
        }
        r.target_path = "/var/lib/kubelet/pods/x/volumes/v/mount".into();
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("volume_capability"))
        );
        let mut block = cap();
        block.access_type = Some(pb::volume_capability::AccessType::Block(Default::default()));
        r.volume_capability = Some(block);
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("block"))
        );
        r.volume_capability = Some(cap());
        for i in 0..=MAX_MAP_ENTRIES {
            r.volume_context.insert(format!("k{i}"), "v".into());
        }
        assert!(
            matches!(parse_publish(r.clone()), Err(NodeError::InvalidArgument(m)) if m.contains("too large"))
        );
        r.volume_context.clear();
        r.secrets.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            "TOKEN-VALUE".into(),
        );
        let ok = parse_publish(r).unwrap();
        assert!(!format!("{ok:?}").contains("TOKEN-VALUE"));
        assert_eq!(
            ok.secrets.get("csi.storage.k8s.io/serviceAccount.tokens"),
            Some("TOKEN-VALUE")
        );
    }

    #[test]
    fn every_node_error_has_its_code() {
        use tonic::Code;
        let table = [
            (
                NodeError::InvalidArgument("m".into()),
                Code::InvalidArgument,
            ),
            (NodeError::NotFound("m".into()), Code::NotFound),
            (NodeError::AlreadyExists("m".into()), Code::AlreadyExists),
            (
                NodeError::PermissionDenied("m".into()),
                Code::PermissionDenied,
            ),
            (
                NodeError::FailedPrecondition("m".into()),
                Code::FailedPrecondition,
            ),
            (NodeError::Unavailable("m".into()), Code::Unavailable),
            (
                NodeError::ResourceExhausted("m".into()),
                Code::ResourceExhausted,
            ),
            (NodeError::Internal("m".into()), Code::Internal),
        ];
        for (e, code) in table {
            let s = status(e);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), "m");
        }
    }
}
