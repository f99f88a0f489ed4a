//! The broker API edge (`keybroker.v1.Broker`): a unix socket for applications, callers
//! attested by the kernel (`SO_PEERCRED`), values only in `Get` answers, `Watch` streaming
//! names and versions only. No protobuf type crosses into keybroker, which implements
//! [`BrokerBackend`]. The value keybroker hands over is zeroized when dropped; the copy in the
//! protobuf message and tonic's encode buffers are not (known gap, docs/SECURITY.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::authority::AuthorityRepair;
use crate::broker_pb as pb;

/// Longest file name a caller may ask for.
const MAX_NAME: usize = 512;
/// Most names one Watch may list.
const MAX_WATCH: usize = 256;

/// Who is calling, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// One value as the API hands it out.
pub struct Value {
    pub bytes: zeroize::Zeroizing<Vec<u8>>,
    pub version: String,
    /// Unix seconds; 0 when the value has no end.
    pub expires_at: i64,
}

/// Why a call was refused; the message names the rule, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    PermissionDenied(String),
    NotFound(String),
    InvalidArgument(String),
}

/// What keybroker implements behind the API.
pub trait BrokerBackend: Send + Sync + 'static {
    /// Whether `caller` may use the API (refusals are audited by the implementation).
    fn admit(&self, caller: Caller, rpc: &str) -> Result<(), BrokerError>;
    /// The value of `name`, for `caller` (already admitted; reads are audited by the
    /// implementation).
    fn get(&self, caller: Caller, name: &str) -> Result<Value, BrokerError>;
    fn list(&self) -> Vec<(String, String)>;
    /// Ticks after every write that changed something.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

fn status(e: BrokerError) -> tonic::Status {
    match e {
        BrokerError::PermissionDenied(m) => tonic::Status::permission_denied(m),
        BrokerError::NotFound(m) => tonic::Status::not_found(m),
        BrokerError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
    }
}

fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    let info = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| tonic::Status::permission_denied("the caller's credentials are unknown"))?;
    Ok(Caller {
        pid: info.pid(),
        uid: info.uid(),
        gid: info.gid(),
    })
}

struct Svc<B> {
    backend: Arc<B>,
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Entry, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl<B: BrokerBackend> pb::broker_server::Broker for Svc<B> {
    async fn get(
        &self,
        req: tonic::Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, tonic::Status> {
        let who = caller(&req)?;
        self.backend.admit(who, "Get").map_err(status)?;
        let name = req.into_inner().name;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(tonic::Status::invalid_argument(
                "name must be 1 to 512 bytes",
            ));
        }
        let v = self.backend.get(who, &name).map_err(status)?;
        Ok(tonic::Response::new(pb::GetResponse {
            value: v.bytes.to_vec(),
            version: v.version,
            expires_at: v.expires_at,
        }))
    }

    async fn list(
        &self,
        req: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListResponse>, tonic::Status> {
        self.backend.admit(caller(&req)?, "List").map_err(status)?;
        Ok(tonic::Response::new(pb::ListResponse {
            entries: self
                .backend
                .list()
                .into_iter()
                .map(|(name, version)| pb::Entry { name, version })
                .collect(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.backend.admit(caller(&req)?, "Watch").map_err(status)?;
        let names = req.into_inner().names;
        if names.len() > MAX_WATCH || names.iter().any(|n| n.len() > MAX_NAME) {
            return Err(tonic::Status::invalid_argument(
                "watch at most 256 names of at most 512 bytes",
            ));
        }
        let backend = self.backend.clone();
        let mut changes = backend.changes();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut seen: std::collections::BTreeMap<String, String> = Default::default();
            loop {
                for (name, version) in backend.list() {
                    if !names.is_empty() && !names.contains(&name) {
                        continue;
                    }
                    if seen.get(&name) != Some(&version) {
                        seen.insert(name.clone(), version.clone());
                        if tx.send(Ok(pb::Entry { name, version })).await.is_err() {
                            return;
                        }
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A bound broker socket, not yet served.
pub struct Bound {
    socket: crate::server::BoundSocket,
    listener: tokio::net::UnixListener,
}

/// Binds the broker socket at `path` (a stale one replaced), mode `mode` so the application's
/// user can connect; the backend still admits callers by credentials.
pub async fn bind(
    path: &std::path::Path,
    mode: u32,
) -> Result<Bound, Box<dyn std::error::Error + Send + Sync>> {
    let (socket, listener) =
        crate::server::bind_socket(&format!("unix://{}", path.display())).await?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(mode & 0o777))?;
    }
    Ok(Bound { socket, listener })
}

/// Serves the broker API on the unix socket at `path` until `shutdown` ([`bind`], then
/// [`serve_bound`]).
pub async fn serve<B: BrokerBackend>(
    path: &std::path::Path,
    mode: u32,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_bound(bind(path, mode).await?, backend, shutdown).await
}

/// Serves a bound socket until `shutdown`, then removes the socket file.
pub async fn serve_bound<B: BrokerBackend>(
    bound: Bound,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Bound { socket, listener } = bound;
    tonic::transport::Server::builder()
        .max_frame_size(Some(64 * 1024))
        .add_service(
            pb::broker_server::BrokerServer::new(Svc { backend })
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(16 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityRepair::new)),
            shutdown,
        )
        .await?;
    socket.remove_if_ours();
    Ok(())
}
