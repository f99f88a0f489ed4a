//! `keybroker node` as a child process, and the kubelet side of the CSI socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use keybroker_csi::pb;
use keybroker_csi::pb::node_client::NodeClient;

use super::{BIN, wait_timeout};

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub metrics: String,
    /// Whether dropping it cleans up (mounts, keeper); off for a process another one replaced.
    cleanup: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "1s")
    }

    /// Starts the node with its bindings at `dir/etc/bindings.yaml` and the given poll interval.
    pub fn start_with(dir: &Path, poll: &str) -> Self {
        Self::start_opts(dir, poll, &dir.join("audit.jsonl"), &[])
    }

    /// Starts the node with an audit log at `audit` and extra `node` flags.
    pub fn start_opts(dir: &Path, poll: &str, audit: &Path, extra: &[&str]) -> Self {
        Self::start_env(dir, poll, audit, extra, &[])
    }

    /// As [`Daemon::start_opts`], with extra environment variables.
    pub fn start_env(
        dir: &Path,
        poll: &str,
        audit: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_env(dir, poll, audit, extra, env, true)
    }

    /// Starts the node; with `wait`, returns once it is ready ([`Daemon::wait_ready`]),
    /// otherwise at once (a process a test kills while it starts).
    pub fn spawn_env(
        dir: &Path,
        poll: &str,
        audit: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        wait: bool,
    ) -> Self {
        let sock = dir.join("csi/csi.sock");
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied()).args(["--log-format", "json"]);
        if extra.first() == Some(&"provider") {
            // `keybroker provider`: the Secrets Store provider API on the socket.
            cmd.arg("provider");
        } else {
            cmd.args(["node", "--node-id", "test-node", "--state-dir"])
                .arg(dir.join("state"));
        }
        let extra = extra.strip_prefix(&["provider"]).unwrap_or(extra);
        let child = cmd
            .args(["--poll-interval", poll])
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--bindings")
            .arg(dir.join("etc/bindings.yaml"))
            .arg("--audit-log")
            .arg(audit)
            .arg("--metrics-addr")
            .arg(&metrics)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_owned(),
            sock,
            metrics,
            cleanup: true,
        };
        if !wait {
            return d;
        }
        d.wait_ready();
        d
    }

    /// Waits (at most 120 s) until /readyz says 200 and the socket answers.
    pub fn wait_ready(&mut self) {
        let d = self;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !d.http("/readyz").starts_with("HTTP/1.1 200") {
            if let Some(Ok(Some(s))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("keybroker node exited: {s}\n{}", d.logs());
            }
            assert!(Instant::now() < deadline, "node not ready:\n{}", d.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The socket answers (a killed predecessor's socket file may still be there until
        // this process binds its own).
        while std::os::unix::net::UnixStream::connect(&d.sock).is_err() {
            assert!(Instant::now() < deadline, "no socket:\n{}", d.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn http(&self, path: &str) -> String {
        let Ok(mut s) = std::net::TcpStream::connect(&self.metrics) else {
            return String::new();
        };
        let _ = write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    pub fn metric(&self, name: &str) -> u64 {
        let page = self.http("/metrics");
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// A process a newer one replaced (restart or handover): its exit is awaited, and
    /// dropping it leaves the volumes (now the newer process's) alone.
    pub fn replaced(mut self) -> std::process::ExitStatus {
        self.cleanup = false;
        match self.child.take() {
            Some(mut c) => wait_timeout(&mut c, Duration::from_secs(30)),
            None => std::process::ExitStatus::default(),
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let s = wait_timeout(&mut c, Duration::from_secs(120));
            assert!(
                s.success(),
                "node did not stop cleanly: {s}\n{}",
                self.logs()
            );
        }
    }
}

impl Daemon {
    /// The fd keeper the node started for itself (`--fd-keeper auto`, in its state directory).
    pub fn keeper(&self) -> keybroker::keeper::KeeperClient {
        keybroker::keeper::KeeperClient::new(&self.dir.join("state/keeper.sock"))
    }
}

impl Drop for Daemon {
    /// Kills the node and detaches every keybroker mount under the test's directory and the
    /// tmpfs staging mounts behind them, so a failing test leaves no secret mounted; then
    /// stops the fd keeper the node started (it outlives the node by design).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.cleanup {
            detach_mounts_under(&self.dir);
            let _ = self.keeper().quit();
        }
    }
}

/// Detaches every keybroker mount at or below `root` (the node's staging tmpfs mounts are
/// under its state directory there too).
pub fn detach_mounts_under(root: &Path) {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<PathBuf> = mi
        .lines()
        .filter(|l| l.contains(" - fuse.keybroker ") || l.contains(" keybroker "))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    targets.sort();
    targets.dedup();
    for t in targets {
        while super::is_mount_point(&t) {
            if nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

pub async fn client(d: &Daemon) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(keybroker_csi::connect_unix(&d.sock).await.unwrap())
}

/// A service-account token as kubelet passes it (the test is the cluster's issuer; the
/// signature is not what keybroker checks).
pub fn sa_token(ns: &str, sa: &str, pod: &str, uid: &str) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let jwt = format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "kid": "test"})),
        b64(serde_json::json!({
            "aud": ["keybroker"], "exp": exp, "iss": "https://kubernetes.default.svc",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": uid}, "serviceaccount": {"name": sa, "uid": "sa-uid"}}
        }))
    );
    serde_json::json!({"keybroker": {"token": jwt, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
        .to_string()
}

pub struct Pod {
    pub ns: &'static str,
    pub sa: &'static str,
    pub name: String,
    pub uid: String,
}

impl Pod {
    pub fn new(ns: &'static str, sa: &'static str, i: usize) -> Self {
        Pod {
            ns,
            sa,
            name: format!("{sa}-{i}"),
            uid: format!("00000000-0000-0000-0000-{i:012}"),
        }
    }

    pub fn target(&self, root: &Path) -> PathBuf {
        root.join(format!(
            "kubelet/pods/{}/volumes/kubernetes.io~csi/secrets/mount",
            self.uid
        ))
    }

    pub fn request(
        &self,
        root: &Path,
        objects: &str,
        kind: &str,
        token_for: Option<&Pod>,
    ) -> pb::NodePublishVolumeRequest {
        self.request_with(
            root,
            &[
                ("provider", "local"),
                ("volumeType", kind),
                ("objects", objects),
            ],
            token_for,
        )
    }

    /// A publish request with kubelet's pod info, a token for `token_for` (default: this
    /// pod) and the pod author's attributes `attrs`.
    pub fn request_with(
        &self,
        root: &Path,
        attrs: &[(&str, &str)],
        token_for: Option<&Pod>,
    ) -> pb::NodePublishVolumeRequest {
        let claims = token_for.unwrap_or(self);
        let secrets = HashMap::from([(
            "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
            sa_token(claims.ns, claims.sa, &claims.name, &claims.uid),
        )]);
        let attrs = attrs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        kubelet_publish(
            (self.ns, self.sa, &self.name, &self.uid),
            &self.target(root),
            attrs,
            secrets,
        )
    }

    pub fn unpublish(&self, root: &Path) -> pb::NodeUnpublishVolumeRequest {
        pb::NodeUnpublishVolumeRequest {
            volume_id: format!("csi-{}", self.uid),
            target_path: self.target(root).display().to_string(),
        }
    }
}

/// NodePublishVolume as kubelet sends it for pod `(namespace, service account, name, uid)`:
/// kubelet's pod info, an ephemeral read-only volume at `target` with the pod author's
/// `attrs`, and `secrets` (the service-account tokens).
pub fn kubelet_publish(
    (ns, sa, name, uid): (&str, &str, &str, &str),
    target: &Path,
    attrs: impl IntoIterator<Item = (String, String)>,
    secrets: HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = [
        ("csi.storage.k8s.io/pod.name", name),
        ("csi.storage.k8s.io/pod.namespace", ns),
        ("csi.storage.k8s.io/pod.uid", uid),
        ("csi.storage.k8s.io/serviceAccount.name", sa),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ctx.extend(attrs);
    pb::NodePublishVolumeRequest {
        volume_id: format!("csi-{uid}"),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
        }),
        readonly: true,
        volume_context: ctx,
        secrets,
        ..Default::default()
    }
}

/// A test directory where the local provider's object `db` holds `db`, and bindings let
/// team-a/api read the objects `objects` (a YAML list, `[db]`) from it.
pub fn local_setup(db: &str, objects: &str) -> (tempfile::TempDir, PathBuf) {
    super::require_root_and_fuse();
    let tmp = super::open_tempdir();
    let root = tmp.path().to_owned();
    std::fs::create_dir_all(root.join("secrets")).unwrap();
    std::fs::write(root.join("secrets/db"), db).unwrap();
    super::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: apps\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {{local: {{path: {}}}}}\n    objects: {objects}\n",
            root.join("secrets").display()
        ),
    );
    (tmp, root)
}
