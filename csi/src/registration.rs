//! kubelet's plugin registration API (`pluginregistration.Registration`), served by the plugin
//! itself: kubelet's plugin watcher finds the socket in `<kubelet root>/plugins_registry`, asks
//! `GetInfo` for the driver's name and CSI socket, and reports the outcome with
//! `NotifyRegistrationStatus`. This replaces the node-driver-registrar sidecar.
//!
//! Across a surge upgrade two processes bind the same socket path one after the other; the
//! outgoing one must not remove the incoming one's socket (kubelet would take the removal for
//! the driver leaving and unregister it), so a socket is removed only while it is still the one
//! this process bound ([`BoundSocket`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::authority::AuthorityRepair;
use crate::registration_pb as pb;

/// The plugin type kubelet's CSI handler takes.
pub const CSI_PLUGIN: &str = "CSIPlugin";
/// The CSI versions served.
pub const CSI_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration socket's usual name in kubelet's `plugins_registry` directory.
pub fn socket_name() -> String {
    format!("{}-reg.sock", crate::DRIVER_NAME)
}

/// What kubelet said of the registration.
pub trait RegistrationStatus: Send + Sync + 'static {
    /// kubelet registered the driver (`error` empty) or refused it (`error` says why).
    fn registration(&self, registered: bool, error: &str);
}

struct Svc<S> {
    csi_endpoint: String,
    status: Arc<S>,
}

#[tonic::async_trait]
impl<S: RegistrationStatus> pb::registration_server::Registration for Svc<S> {
    async fn get_info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        Ok(Response::new(pb::PluginInfo {
            r#type: CSI_PLUGIN.into(),
            name: crate::DRIVER_NAME.into(),
            endpoint: self.csi_endpoint.clone(),
            supported_versions: CSI_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let r = req.into_inner();
        // kubelet's text, bounded: it lands in logs and /readyz.
        let error: String = r.error.chars().take(1024).collect();
        self.status.registration(r.plugin_registered, &error);
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}

/// Serves the registration API on `socket` (created, a stale file replaced), naming
/// `csi_socket` (the CSI socket's path as kubelet sees it) until `shutdown`; the socket is
/// removed afterwards unless another process has bound that path since.
pub async fn serve<S: RegistrationStatus>(
    socket: &Path,
    csi_socket: &Path,
    status: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (bound, listener) = crate::server::bind_socket(&socket.display().to_string()).await?;
    serve_on(listener, Some(bound), csi_socket, status, shutdown).await
}

/// Like [`serve`], on a socket already listening. Its file is removed at the end only if
/// `bound` is given: a socket kept for the next process stays, and kubelet, which watches the
/// file, keeps the driver registered.
pub async fn serve_on<S: RegistrationStatus>(
    listener: tokio::net::UnixListener,
    bound: Option<crate::server::BoundSocket>,
    csi_socket: &Path,
    status: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = Svc {
        csi_endpoint: csi_socket.display().to_string(),
        status,
    };
    let res = tonic::transport::Server::builder()
        .add_service(pb::registration_server::RegistrationServer::new(svc))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityRepair::new)),
            shutdown,
        )
        .await;
    if let Some(bound) = bound {
        bound.remove_if_ours();
    }
    res?;
    Ok(())
}

/// The registration socket's path in `dir` (kubelet's `plugins_registry`).
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join(socket_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(bool, String)>>);

    impl RegistrationStatus for Seen {
        fn registration(&self, registered: bool, error: &str) {
            self.0.lock().unwrap().push((registered, error.to_owned()));
        }
    }

    /// kubelet's plugin watcher's calls, over the socket.
    #[tokio::test]
    async fn answers_kubelets_plugin_watcher_and_reports_its_verdict() {
        let dir = tempfile_dir();
        let sock = socket_in(&dir);
        let seen = Arc::new(Seen::default());
        let stop = tokio_util_like_notify();
        let server = tokio::spawn({
            let (sock, seen, stop) = (sock.clone(), seen.clone(), stop.clone());
            async move {
                serve(
                    &sock,
                    Path::new("/var/lib/kubelet/plugins/x/csi.sock"),
                    seen,
                    async move { stop.notified().await },
                )
                .await
                .unwrap()
            }
        });
        while !sock.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut c = pb::registration_client::RegistrationClient::new(
            crate::connect_unix(&sock).await.unwrap(),
        );
        let info = c.get_info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.keybroker.io");
        assert_eq!(info.endpoint, "/var/lib/kubelet/plugins/x/csi.sock");
        assert_eq!(info.supported_versions, ["1.0.0"]);
        c.notify_registration_status(pb::RegistrationStatus {
            plugin_registered: false,
            error: "plugin csi.keybroker.io: version 0.9 is not supported".into(),
        })
        .await
        .unwrap();
        assert_eq!(
            seen.0.lock().unwrap().as_slice(),
            [(
                false,
                "plugin csi.keybroker.io: version 0.9 is not supported".to_string()
            )]
        );
        stop.notify_one();
        server.await.unwrap();
        assert!(!sock.exists(), "its own socket is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_outgoing_process_leaves_the_incoming_ones_socket() {
        let dir = tempfile_dir();
        let sock = socket_in(&dir);
        let seen = Arc::new(Seen::default());
        let (stop_old, stop_new) = (tokio_util_like_notify(), tokio_util_like_notify());
        let start = |stop: Arc<tokio::sync::Notify>| {
            let (sock, seen) = (sock.clone(), seen.clone());
            tokio::spawn(async move {
                serve(&sock, Path::new("/csi.sock"), seen, async move {
                    stop.notified().await
                })
                .await
                .unwrap()
            })
        };
        let old = start(stop_old.clone());
        while !sock.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let ino = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        };
        let first = ino(&sock);
        // The incoming process binds the same path (replacing the file), then the old one
        // stops: the path stays the incoming one's.
        let new = start(stop_new.clone());
        while ino(&sock) == first {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop_old.notify_one();
        old.await.unwrap();
        assert!(
            sock.exists(),
            "the outgoing process removed the incoming one's socket"
        );
        let mut c = pb::registration_client::RegistrationClient::new(
            crate::connect_unix(&sock).await.unwrap(),
        );
        c.get_info(pb::InfoRequest {}).await.unwrap();
        stop_new.notify_one();
        new.await.unwrap();
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kb-reg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tokio_util_like_notify() -> Arc<tokio::sync::Notify> {
        Arc::new(tokio::sync::Notify::new())
    }
}
