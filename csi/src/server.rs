//! tonic services on a unix socket, and a client connector for tests and tools.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::authority::AuthorityRepair;
use tonic::{Request, Response, Status};

use crate::pb;
use crate::{DRIVER_NAME, NodePlugin, parse_publish, parse_unpublish, status};

struct IdentitySvc<P> {
    plugin: Arc<P>,
    controller: bool,
}

#[tonic::async_trait]
impl<P: NodePlugin> pb::identity_server::Identity for IdentitySvc<P> {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{Service, Type, service};
        let capabilities = if self.controller {
            vec![pb::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            }]
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.plugin.ready()),
        }))
    }
}

struct NodeSvc<P> {
    plugin: Arc<P>,
}

#[tonic::async_trait]
impl<P: NodePlugin> pb::node_server::Node for NodeSvc<P> {
    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = parse_publish(req.into_inner()).map_err(status)?;
        self.plugin.publish(req).await.map_err(status)?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = parse_unpublish(req.into_inner()).map_err(status)?;
        self.plugin.unpublish(req).await.map_err(status)?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        // No staging, no stats: ephemeral inline volumes are published directly.
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.plugin.node_id(),
            max_volumes_per_node: 0,
        }))
    }
}

#[cfg(feature = "test-controller")]
mod test_controller {
    //! Pretends to create volumes so csi-sanity can run its node lifecycle tests against a
    //! node-only driver. Compiled only with the `test-controller` feature.
    use super::*;

    pub(super) struct ControllerStub;

    #[tonic::async_trait]
    impl pb::controller_server::Controller for ControllerStub {
        async fn create_volume(
            &self,
            req: Request<pb::CreateVolumeRequest>,
        ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
            let r = req.into_inner();
            if r.name.is_empty() {
                return Err(Status::invalid_argument("name is required"));
            }
            if r.volume_capabilities.is_empty() {
                return Err(Status::invalid_argument("volume_capabilities are required"));
            }
            let capacity = r.capacity_range.map(|c| c.required_bytes).unwrap_or(0);
            Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(pb::Volume {
                    capacity_bytes: capacity,
                    volume_id: format!("stub-{}", r.name),
                    volume_context: r.parameters,
                }),
            }))
        }

        async fn delete_volume(
            &self,
            req: Request<pb::DeleteVolumeRequest>,
        ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
            if req.into_inner().volume_id.is_empty() {
                return Err(Status::invalid_argument("volume_id is required"));
            }
            Ok(Response::new(pb::DeleteVolumeResponse {}))
        }

        async fn validate_volume_capabilities(
            &self,
            req: Request<pb::ValidateVolumeCapabilitiesRequest>,
        ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
            let r = req.into_inner();
            if r.volume_id.is_empty() {
                return Err(Status::invalid_argument("volume_id is required"));
            }
            if r.volume_capabilities.is_empty() {
                return Err(Status::invalid_argument("volume_capabilities are required"));
            }
            Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                }),
                message: String::new(),
            }))
        }

        async fn controller_get_capabilities(
            &self,
            _: Request<pb::ControllerGetCapabilitiesRequest>,
        ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
            use pb::controller_service_capability::{Rpc, Type, rpc};
            Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
                capabilities: vec![pb::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc {
                        r#type: rpc::Type::CreateDeleteVolume as i32,
                    })),
                }],
            }))
        }
    }
}

/// Parses `unix:///path/csi.sock` (or a bare absolute path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "endpoint must be unix:///absolute/path, got {endpoint:?}"
        ));
    }
    Ok(p.to_owned())
}

/// `bind(2)` takes at most 107 bytes of path: a longer one (a socket inside a kubelet volume
/// path) is bound through its directory's `/proc/self/fd` entry.
fn bind_long(path: &Path) -> std::io::Result<UnixListener> {
    const SUN_PATH_MAX: usize = 107;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixListener::bind(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixListener::bind(path);
    };
    let dir = std::fs::File::open(dir)?;
    use std::os::fd::AsRawFd;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    UnixListener::bind(short)
}

/// A socket file this process bound, known by its inode: removed at the end only while the
/// path still names it. In a surge upgrade the incoming process binds the same path before the
/// outgoing one stops, and the outgoing one must not remove the incoming one's socket.
pub struct BoundSocket {
    pub path: PathBuf,
    id: Option<(u64, u64)>,
}

impl BoundSocket {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        BoundSocket {
            path: path.to_owned(),
            id: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn remove_if_ours(&self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        } else if now.is_some() {
            tracing::info!(socket = %self.path.display(), "the socket path was bound again by another process; left to it");
        }
    }
}

/// Binds the unix socket of `endpoint`: its directory created, a stale socket file replaced,
/// the socket owner-only (its clients, kubelet or the Secrets Store driver, run as root).
pub async fn bind_socket(
    endpoint: &str,
) -> Result<(BoundSocket, UnixListener), Box<dyn std::error::Error + Send + Sync>> {
    let path = socket_path(endpoint)?;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    match tokio::fs::remove_file(&path).await {
        Ok(()) => tracing::info!(socket = %path.display(), "replaced a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = bind_long(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((BoundSocket::of(&path), listener))
}

/// Serves Identity and Node (and, in test builds asked for it, the controller stub) on the unix
/// socket at `endpoint` until `shutdown` completes. A stale socket file is replaced; the socket
/// is made owner-only (kubelet runs as root).
pub async fn serve<P: NodePlugin>(
    endpoint: &str,
    plugin: Arc<P>,
    test_controller: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (path, listener) = bind_socket(endpoint).await?;
    serve_on(listener, Some(path), plugin, test_controller, shutdown).await
}

/// Like [`serve`], on a socket already listening (bound by [`bind_socket`] or kept from a
/// previous process). Its file is removed at the end only if `bound` is given (and still names
/// it): a socket kept for the next process stays.
pub async fn serve_on<P: NodePlugin>(
    listener: UnixListener,
    bound: Option<BoundSocket>,
    plugin: Arc<P>,
    test_controller: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    #[cfg(not(feature = "test-controller"))]
    if test_controller {
        return Err("this build has no test controller (cargo feature test-controller)".into());
    }
    // The listener queues connections from here on: calls are answered once serving starts.
    plugin.serving();
    let router = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(IdentitySvc {
            plugin: plugin.clone(),
            controller: test_controller,
        }))
        .add_service(pb::node_server::NodeServer::new(NodeSvc { plugin }));
    #[cfg(feature = "test-controller")]
    let router = router
        .add_optional_service(test_controller.then(|| {
            pb::controller_server::ControllerServer::new(test_controller::ControllerStub)
        }));
    router
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityRepair::new)),
            shutdown,
        )
        .await?;
    if let Some(path) = bound {
        path.remove_if_ours();
    }
    Ok(())
}

/// A gRPC channel to a unix socket (for kubelet-like clients in tests and tools).
pub async fn connect_unix(
    path: impl AsRef<Path>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.as_ref().to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
