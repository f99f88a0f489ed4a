//! Real peers the provider tests run against, started per test on loopback and stopped when
//! dropped: OpenBao (`bao server -dev` with TLS and a file audit device), PostgreSQL (a
//! throw-away cluster), and the cluster's service-account issuer (an RSA key that signs pod
//! tokens). The binaries come from `scripts/install-peers.sh`; a missing one fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;

use super::node::free_port;

pub fn peers_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".peers/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-peers.sh (the test suite needs the real peer)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OpenBao dev server with TLS (its own CA) and an audit log that counts every request.
/// The policy most tests and benches give role `app`: read `secret/data/app/*` (KV v2).
pub const READ_APP_SECRETS: &str = "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n";

pub struct Bao {
    child: Child,
    pub addr: String,
    pub ca: PathBuf,
    pub audit_log: PathBuf,
    dir: PathBuf,
    /// The network namespace it listens in (its CLI runs there too); `None`: this one's.
    netns: Option<PathBuf>,
}

impl Bao {
    pub fn start(dir: &Path) -> Self {
        Self::start_at(dir, None)
    }

    /// OpenBao listening on `ip`:8200 inside the network namespace `netns` (a test cluster's:
    /// its pods and its apiserver reach it there, and it reaches the apiserver).
    pub fn start_in_netns(dir: &Path, netns: &Path, ip: &str) -> Self {
        Self::start_at(dir, Some((netns, ip)))
    }

    fn start_at(dir: &Path, netns: Option<(&Path, &str)>) -> Self {
        let bin = peers_bin("bao");
        let dir = dir.join("bao");
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        let audit_log = dir.join("audit.jsonl");
        std::fs::write(
            dir.join("audit.hcl"),
            format!(
                "audit \"file\" \"count\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )
        .unwrap();
        // A port picked this way can be taken again (as another connection's source port)
        // before OpenBao binds it: a server that exits at start is started again on another.
        for attempt in 1.. {
            let (host, port) = match netns {
                Some((_, ip)) => (ip, 8200),
                None => ("127.0.0.1", free_port()),
            };
            let log = std::fs::File::create(dir.join("server.log")).unwrap();
            let mut cmd = match netns {
                Some((ns, _)) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net={}", ns.display())).arg("--").arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            let child = cmd
                .args(["server", "-dev", "-dev-tls", "-dev-root-token-id=root"])
                .arg(format!("-dev-tls-cert-dir={}", dir.join("tls").display()))
                .arg(format!("-dev-listen-address={host}:{port}"))
                .arg(format!("-config={}", dir.join("audit.hcl").display()))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut bao = Bao {
                child,
                addr: format!("https://{host}:{port}"),
                ca: dir.join("tls/vault-ca.pem"),
                audit_log: audit_log.clone(),
                dir: dir.clone(),
                netns: netns.map(|(ns, _)| ns.to_owned()),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ok = bao.ca.exists()
                    && bao
                        .command(&["status", "-format=json"])
                        .output()
                        .is_ok_and(|o| o.status.success());
                if ok {
                    // Who sent each request: the audit log records User-Agent from now on.
                    bao.cli(&[
                        "write",
                        "sys/config/auditing/request-headers/user-agent",
                        "hmac=false",
                    ]);
                    return bao;
                }
                let exited = bao.child.try_wait().ok().flatten().is_some();
                let log =
                    || std::fs::read_to_string(bao.dir.join("server.log")).unwrap_or_default();
                assert!(
                    Instant::now() < deadline && (!exited || attempt < 3),
                    "OpenBao did not start:\n{}",
                    log()
                );
                if exited {
                    eprintln!(
                        "OpenBao exited at start (attempt {attempt}); starting it again:\n{}",
                        log()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        unreachable!()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(peers_bin("bao"));
                c
            }
            None => Command::new(peers_bin("bao")),
        };
        if self.netns.is_some() {
            // The dev-tls certificate names localhost and 127.0.0.1, not the namespace's
            // address.
            c.env("BAO_TLS_SERVER_NAME", "localhost");
        }
        c.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_CACERT", &self.ca)
            .env("BAO_TOKEN", "root")
            .stdin(Stdio::null());
        c
    }

    /// Runs a `bao` command as root; panics with its stderr when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    /// Runs `bao` in namespace `ns` (the root namespace for `None`).
    pub fn cli_in(&self, ns: Option<&str>, args: &[&str]) -> String {
        let mut c = self.command(args);
        if let Some(ns) = ns {
            c.env("BAO_NAMESPACE", ns);
        }
        run(&mut c)
    }

    /// Enables JWT auth at `jwt/` (in `ns`) trusting `issuer`'s key, as Vault is set up to trust
    /// a cluster's service-account issuer.
    pub fn trust_issuer(&self, ns: Option<&str>, issuer: &Issuer) {
        let pem = self.dir.join("issuer.pem");
        std::fs::write(&pem, &issuer.public_pem).unwrap();
        self.cli_in(ns, &["auth", "enable", "jwt"]);
        self.cli_in(
            ns,
            &[
                "write",
                "auth/jwt/config",
                &format!("jwt_validation_pubkeys=@{}", pem.display()),
                &format!("bound_issuer={}", issuer.iss),
            ],
        );
    }

    /// Writes JWT role `role` with policy `role` for the tokens of one service account
    /// (`ns_sa` = "namespace:name") with audience `vault`; `extra` adds role fields.
    pub fn jwt_role(&self, ns: Option<&str>, role: &str, ns_sa: &str, extra: &[&str]) {
        let mut args = vec![
            "write".to_string(),
            format!("auth/jwt/role/{role}"),
            "role_type=jwt".into(),
            "user_claim=sub".into(),
            "bound_audiences=vault".into(),
            format!("bound_subject=system:serviceaccount:{ns_sa}"),
            format!("token_policies={role}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.cli_in(ns, &args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Writes policy `name` (in `ns`).
    /// OpenBao started in `dir`, trusting `issuer`'s tokens through JWT auth, with role `app`
    /// for `ns_sa` (`namespace:serviceaccount`; tokens of 1 h) under policy `policy` (HCL).
    pub fn with_jwt_role(dir: &Path, issuer: &Issuer, ns_sa: &str, policy: &str) -> Self {
        let bao = Bao::start(dir);
        bao.trust_issuer(None, issuer);
        bao.jwt_role(None, "app", ns_sa, &["token_ttl=1h"]);
        bao.policy(None, "app", policy);
        bao
    }

    /// What the benches publish against: [`Bao::with_jwt_role`] for `bench:app` reading
    /// `secret/data/app/*`, and its issuer.
    pub fn for_bench(dir: &Path) -> (Self, Issuer) {
        let issuer = Issuer::new(dir);
        let bao = Bao::with_jwt_role(dir, &issuer, "bench:app", READ_APP_SECRETS);
        (bao, issuer)
    }

    /// KV v2 secrets `secret/app/k0`.. `k{n-1}`, each `value=bench-value-<i>` (the benches').
    pub fn put_bench_objects(&self, n: usize) {
        for o in 0..n {
            self.cli(&[
                "kv",
                "put",
                &format!("secret/app/k{o}"),
                &format!("value=bench-value-{o}"),
            ]);
        }
    }

    /// The database secrets engine on `pg`, with role `app` creating login roles that live
    /// `default_ttl` (renewable up to `max_ttl`).
    pub fn enable_database(&self, pg: &Postgres, default_ttl: &str, max_ttl: &str) {
        self.cli(&["secrets", "enable", "database"]);
        self.cli(&[
            "write",
            "database/config/pg",
            "plugin_name=postgresql-database-plugin",
            &format!(
                "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
                pg.port
            ),
            "username=postgres",
            &format!("password={}", pg.password),
            "allowed_roles=*",
        ]);
        self.cli(&[
            "write",
            "database/roles/app",
            "db_name=pg",
            "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            &format!("default_ttl={default_ttl}"),
            &format!("max_ttl={max_ttl}"),
        ]);
    }

    /// A PKI mount at `pki/` with a root of 24 h and role `web` issuing names under
    /// `example.test` for at most `max_ttl`.
    pub fn enable_pki(&self, max_ttl: &str) {
        self.cli(&["secrets", "enable", "pki"]);
        self.cli(&["secrets", "tune", "-max-lease-ttl=24h", "pki"]);
        self.cli(&[
            "write",
            "pki/root/generate/internal",
            "common_name=keybroker test root",
            "ttl=24h",
        ]);
        self.cli(&[
            "write",
            "pki/roles/web",
            "allowed_domains=example.test",
            "allow_subdomains=true",
            &format!("max_ttl={max_ttl}"),
        ]);
    }

    pub fn policy(&self, ns: Option<&str>, name: &str, hcl: &str) {
        let file = self.dir.join(format!("policy-{name}.hcl"));
        std::fs::write(&file, hcl).unwrap();
        self.cli_in(ns, &["policy", "write", name, file.to_str().unwrap()]);
    }

    /// Requests in the audit log (not the root token's test setup) whose path matches `pred`.
    pub fn requests(&self, pred: impl Fn(&str, &str) -> bool) -> usize {
        self.request_records()
            .iter()
            .filter(|v| {
                pred(
                    v["request"]["operation"].as_str().unwrap_or_default(),
                    v["request"]["path"].as_str().unwrap_or_default(),
                )
            })
            .count()
    }

    /// The audit log's request records, without the root token's test setup.
    pub fn request_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .filter(|v| {
                !v["auth"]["policies"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x == "root"))
            })
            .collect()
    }

    /// The User-Agent of every client request in the audit log that did not come from the root
    /// token (OpenBao's own check of a new audit device, `sys/audit/test`, has none).
    pub fn user_agents(&self) -> std::collections::BTreeSet<String> {
        self.request_records()
            .iter()
            .filter(|v| v["request"]["path"] != "sys/audit/test")
            .map(|v| {
                let ua = &v["request"]["headers"]["user-agent"];
                // Vault records a header as a list of its values.
                ua.as_array()
                    .and_then(|a| a.first())
                    .unwrap_or(ua)
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned()
            })
            .collect()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throw-away PostgreSQL cluster on a loopback port, superuser `postgres` with a password.
pub struct Postgres {
    pub port: u16,
    pub password: String,
    data: PathBuf,
    bin: PathBuf,
    /// The network namespace it listens in (on that namespace's loopback); `None`: this one's.
    netns: Option<PathBuf>,
}

/// `cmd` run in the network namespace `netns` (`nsenter`), or as it is.
fn in_netns(netns: Option<&Path>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Postgres {
    pub fn start(dir: &Path) -> Self {
        Self::start_at(dir, None)
    }

    /// PostgreSQL on the loopback of the network namespace `netns` (a test cluster's, where an
    /// OpenBao of [`Bao::start_in_netns`] reaches it).
    pub fn start_in_netns(dir: &Path, netns: &Path) -> Self {
        Self::start_at(dir, Some(netns))
    }

    fn start_at(dir: &Path, netns: Option<&Path>) -> Self {
        let bin = PathBuf::from("/usr/lib/postgresql/15/bin");
        assert!(
            bin.join("initdb").exists(),
            "PostgreSQL 15 is missing: run scripts/install-peers.sh"
        );
        let root = dir.join("pg");
        let data = root.join("data");
        std::fs::create_dir_all(&root).unwrap();
        let password = "pg-super-Test-Only-1".to_string();
        std::fs::write(root.join("pw"), &password).unwrap();
        // PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&root));
        run(Command::new("chmod").args(["0755"]).arg(dir));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "scram-sha-256", "-U", "postgres", "--no-sync"])
            .arg(format!("--pwfile={}", root.join("pw").display()))
            .arg("-D")
            .arg(&data));
        // In a namespace of its own nothing else listens: the usual port.
        let port = if netns.is_some() { 5432 } else { free_port() };
        run(in_netns(netns, Path::new("runuser"))
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(root.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                root.display()
            ))
            .args(["-w", "start"]));
        Postgres {
            port,
            password,
            data,
            bin,
            netns: netns.map(Path::to_owned),
        }
    }

    /// Whether `user`/`password` can log in and run a query; the error text otherwise.
    pub fn try_login(&self, conninfo_or_uri: &str) -> Result<String, String> {
        let out = in_netns(self.netns.as_deref(), Path::new("psql"))
            .arg(conninfo_or_uri)
            .args(["-tAc", "select current_user"])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn login(&self, user: &str, password: &str) -> Result<String, String> {
        self.try_login(&format!(
            "host=127.0.0.1 port={} dbname=postgres user={user} password={password} connect_timeout=5",
            self.port
        ))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// The cluster's service-account token issuer: an RSA key that signs RS256 pod tokens.
pub struct Issuer {
    key: ring::signature::RsaKeyPair,
    pub public_pem: String,
    pub iss: String,
}

pub struct TokenSpec<'a> {
    pub ns: &'a str,
    pub sa: &'a str,
    pub pod: &'a str,
    pub uid: &'a str,
    pub audience: &'a str,
    /// Seconds from now; negative for an expired token.
    pub expires_in: i64,
}

impl Issuer {
    pub fn new(dir: &Path) -> Self {
        let d = dir.join("issuer");
        std::fs::create_dir_all(&d).unwrap();
        let pem = d.join("key.pem");
        run(Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem));
        run(Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&pem)
            .arg("-out")
            .arg(d.join("key.der")));
        let public_pem = run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&pem));
        let der = std::fs::read(d.join("key.der")).unwrap();
        let key = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
        Issuer {
            key,
            public_pem,
            iss: "https://kubernetes.default.svc.cluster.local".into(),
        }
    }

    /// Serves this issuer's OIDC discovery document and JWKS on a loopback HTTP port (as a
    /// cluster publishes them for workload identity federation) and makes that URL the
    /// issuer (`iss`) of the tokens it signs from now on. Served until the process ends.
    pub fn serve_discovery(&mut self, dir: &Path) {
        let pem = dir.join("issuer/key.pem");
        let modulus = run(Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&pem));
        let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({
            "issuer": url, "jwks_uri": format!("{url}/openid/v1/jwks"),
            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "test-issuer",
            "n": b64(&n), "e": b64(&[1, 0, 1]),
        }]})
        .to_string();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split(' ').nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/.well-known/openid-configuration" => ("200 OK", discovery.as_str()),
                    "/openid/v1/jwks" => ("200 OK", jwks.as_str()),
                    _ => ("404 Not Found", "{}"),
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        self.iss = url;
    }

    /// A signed service-account token with the claims kubelet's TokenRequest gives a pod.
    pub fn token(&self, t: &TokenSpec) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let header = serde_json::json!({"alg": "RS256", "kid": "test-issuer", "typ": "JWT"});
        let claims = serde_json::json!({
            "aud": [t.audience], "exp": now + t.expires_in, "iat": now - 5, "nbf": now - 5,
            "iss": self.iss,
            "sub": format!("system:serviceaccount:{}:{}", t.ns, t.sa),
            "kubernetes.io": {
                "namespace": t.ns,
                "pod": {"name": t.pod, "uid": t.uid},
                "serviceaccount": {"name": t.sa, "uid": "5a5a5a5a-0000-0000-0000-000000000001"}
            }
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{signing_input}.{}", b64(&sig))
    }

    /// kubelet's `csi.storage.k8s.io/serviceAccount.tokens` map for the given tokens.
    pub fn kubelet_tokens(&self, specs: &[TokenSpec]) -> String {
        let mut m = serde_json::Map::new();
        for t in specs {
            let exp = humantime_rfc3339(t.expires_in);
            m.insert(
                t.audience.to_string(),
                serde_json::json!({"token": self.token(t), "expirationTimestamp": exp}),
            );
        }
        serde_json::Value::Object(m).to_string()
    }
}

fn humantime_rfc3339(expires_in: i64) -> String {
    let now = SystemTime::now();
    let t = if expires_in >= 0 {
        now + Duration::from_secs(expires_in as u64)
    } else {
        now - Duration::from_secs((-expires_in) as u64)
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The Python of the peers' virtualenv (grpcio and the other pinned Python clients).
pub fn peers_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".peers/venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-peers.sh (the test suite needs the real peer)",
        p.display()
    );
    p
}

/// What HashiCorp's Vault CSI provider does for one Mount, as measured against OpenBao (issue
/// #9): log in with the pod's token, then read each object in turn (`secret/data/app/k0..k9`,
/// role `app`). The benchmarks' model of the peer, run with a plain HTTP client.
pub async fn vault_csi_provider_mount(http: &reqwest::Client, bao: &Bao, jwt: &str) {
    let body = serde_json::json!({"role": "app", "jwt": jwt}).to_string();
    let reply = http
        .post(format!("{}/v1/auth/jwt/login", bao.addr))
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let login: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    let token = login["auth"]["client_token"].as_str().unwrap().to_owned();
    for o in 0..10 {
        let r = http
            .get(format!("{}/v1/secret/data/app/k{o}", bao.addr))
            .header("X-Vault-Token", &token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
    }
}
