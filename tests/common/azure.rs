//! The Entra ID + Key Vault stand-in (`tests/peers/azure_standin.py`), started per test on
//! loopback with the peers' Python and stopped when dropped. Its fidelity is checked by
//! `tests/peers/azure_conformance.py` with Microsoft's own SDK (`tests/azure_e2e.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::peers::peers_python;

/// The tests' Entra tenant and workload identity app.
pub const TENANT: &str = "72f988bf-0000-4000-8000-00000000c0de";
pub const APP: &str = "11111111-2222-4333-8444-555555555555";

pub struct AzureStandin {
    child: Child,
    /// The network namespace it listens in (None: the test's own).
    netns: Option<PathBuf>,
    pub dir: PathBuf,
    pub https_port: u16,
    pub http_port: u16,
    pub identity_header: String,
    client: reqwest::Client,
}

pub fn standin_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(name)
}

impl AzureStandin {
    /// Starts the stand-in with its files (CA, ready.json, log) under `dir/azure`.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_at(dir, extra, None)
    }

    /// Starts the stand-in on the loopback of network namespace `netns` (a test cluster's:
    /// its pods reach `localhost:PORT`, and it reaches the apiserver as an issuer); the
    /// admin calls of this test go there too.
    pub fn start_in_netns(dir: &Path, netns: &Path, extra: &[&str]) -> Self {
        Self::start_at(dir, extra, Some(netns))
    }

    fn start_at(dir: &Path, extra: &[&str], netns: Option<&Path>) -> Self {
        let d = dir.join("azure");
        std::fs::create_dir_all(&d).unwrap();
        let log = std::fs::File::create(d.join("standin.log")).unwrap();
        // Everything that can panic comes before the spawn or after `s` exists (whose Drop
        // stops the process), so a failing test never leaves a stand-in running.
        let client = keybroker::tls::client_builder(None, "test")
            .unwrap()
            .build()
            .unwrap();
        let python = peers_python();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(python);
                c
            }
            None => Command::new(python),
        };
        let child = cmd
            .arg(standin_script("azure_standin.py"))
            .arg("--dir")
            .arg(&d)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the Azure stand-in");
        let mut s = AzureStandin {
            child,
            netns: netns.map(Path::to_owned),
            dir: d.clone(),
            https_port: 0,
            http_port: 0,
            identity_header: String::new(),
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            if let Ok(text) = std::fs::read_to_string(d.join("ready.json")) {
                break serde_json::from_str::<serde_json::Value>(&text).unwrap();
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!(
                    "the Azure stand-in exited ({status}): {}",
                    std::fs::read_to_string(d.join("standin.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the Azure stand-in did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        s.https_port = ready["https_port"].as_u64().unwrap() as u16;
        s.http_port = ready["http_port"].as_u64().unwrap() as u16;
        s.identity_header = ready["identity_header"].as_str().unwrap().to_owned();
        s.client =
            keybroker::tls::client_builder(Some(&std::fs::read(s.ca()).unwrap()), "stand-in")
                .unwrap()
                .build()
                .unwrap();
        s
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The identity of a keybroker binding for [`APP`] of [`TENANT`] through this stand-in
    /// (Entra and Key Vault endpoints, its CA), as YAML flow.
    pub fn binding_identity(&self) -> String {
        format!(
            "{{azure: {{tenantID: {TENANT}, clientID: {APP}, authorityHost: \"{}\", keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: {}}}}}",
            self.authority(),
            self.https_port,
            self.ca().display()
        )
    }

    /// The Entra authority host (`https://localhost:PORT`).
    pub fn authority(&self) -> String {
        format!("https://localhost:{}", self.https_port)
    }

    /// A vault's URL (`https://NAME.vault.localhost:PORT`).
    pub fn vault_url(&self, name: &str) -> String {
        format!("https://{name}.vault.localhost:{}", self.https_port)
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let url = format!("{}/_standin/{path}", self.authority());
        let send = |client: &reqwest::Client| {
            let request = client
                .request(method, &url)
                .header("content-type", "application/json")
                .body(body.to_string());
            async move {
                let resp = request.send().await.unwrap_or_else(|e| panic!("{e}"));
                (resp.status(), resp.text().await.unwrap())
            }
        };
        let (status, text) = match &self.netns {
            None => send(&self.client).await,
            Some(ns) => {
                // A client of its own on a runtime of its own, so no pooled connection
                // outlives the runtime that drives it.
                let ca = std::fs::read(self.ca()).unwrap();
                let request = send(
                    &keybroker::tls::client_builder(Some(&ca), "stand-in")
                        .unwrap()
                        .build()
                        .unwrap(),
                );
                in_netns(ns, move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(request)
                })
            }
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// Tenant [`TENANT`], app [`APP`] with a federated credential for the service account
    /// `ns:sa` of `issuer` (audience `api://AzureADTokenExchange`), and vault `kv1` it may read.
    pub async fn workload_identity(&self, issuer: &str, ns_sa: &str) {
        self.post("tenants", serde_json::json!({"tenant": TENANT}))
            .await;
        self.post(
            "apps",
            serde_json::json!({"tenant": TENANT, "clientId": APP, "federated": [{
                "issuer": issuer,
                "subject": format!("system:serviceaccount:{ns_sa}"),
                "audiences": ["api://AzureADTokenExchange"],
            }]}),
        )
        .await;
        self.post(
            "vaults",
            serde_json::json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read"}}),
        )
        .await;
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.admin(reqwest::Method::POST, path, body).await
    }

    /// Every request the stand-in answered (not the admin ones), oldest first.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        let v = self
            .admin(reqwest::Method::GET, "requests", serde_json::Value::Null)
            .await;
        v["requests"].as_array().cloned().unwrap_or_default()
    }

    /// A version of secret `name` in vault `vault` with `value`.
    pub async fn secret(&self, vault: &str, name: &str, value: &str) {
        self.post(
            &format!("vaults/{vault}/secrets/{name}"),
            serde_json::json!({ "value": value }),
        )
        .await;
    }

    /// The requests the stand-in answered of one `kind` (`managed-identity`, ...).
    pub async fn requests_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("standin.log")).unwrap_or_default()
    }
}

/// Runs `f` on a thread of its own that has joined network namespace `netns` (sockets it
/// opens belong to that namespace; the calling thread's stays as it was).
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Drop for AzureStandin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
