//! `keybroker node` as a child process, and the kubelet side of the CSI socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keybroker_csi::pb::node_client::NodeClient;

use super::{BIN, wait_timeout};

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub metrics: String,
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
        let sock = dir.join("csi/csi.sock");
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "--log-format",
                "json",
                "node",
                "--node-id",
                "test-node",
                "--poll-interval",
                poll,
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--bindings")
            .arg(dir.join("etc/bindings.yaml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .arg("--metrics-addr")
            .arg(&metrics)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_owned(),
            sock,
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.http("/readyz").starts_with("HTTP/1.1 200") {
            if let Some(Ok(Some(s))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("keybroker node exited: {s}\n{}", d.logs());
            }
            assert!(Instant::now() < deadline, "node not ready:\n{}", d.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        while !d.sock.exists() {
            assert!(Instant::now() < deadline, "no socket:\n{}", d.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
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
            let s = wait_timeout(&mut c, Duration::from_secs(20));
            assert!(
                s.success(),
                "node did not stop cleanly: {s}\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn client(d: &Daemon) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(keybroker_csi::connect_unix(&d.sock).await.unwrap())
}
