//! `keybroker init` and `keybroker sidecar` run as a pod runs them: as processes, as an
//! ordinary user without capabilities (setpriv), writing into a shared directory, with the
//! pod's own identity (a token file the test rewrites as kubelet does, or the workload identity
//! environment), and rotation notices to the app.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::azure::{APP, AzureStandin, TENANT};
use common::peers::{Bao, Issuer, TokenSpec};
use common::*;
use serde_json::json;

const NOBODY: &str = "65534";

/// A directory tree the unprivileged user may use.
fn nobody_dir() -> tempfile::TempDir {
    let tmp = open_tempdir();
    std::fs::create_dir_all(tmp.path().join("shared")).unwrap();
    std::process::Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(tmp.path())
        .status()
        .unwrap();
    tmp
}

/// `keybroker init --config CONFIG --dir DIR EXTRA...`, unprivileged.
fn unprivileged_init(config: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut args = vec![
        "init",
        "--config",
        config.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    unprivileged(&args, env)
}

/// `keybroker <args>` as uid/gid 65534 with no capabilities at all (ambient, bounding and
/// inheritable sets cleared), as a restricted pod runs it.
fn unprivileged(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        BIN,
    ])
    .args(args)
    .envs(env.iter().copied());
    c
}

struct Running(Child, PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn spawn(mut c: Command, log: &Path) -> Running {
    let child = c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Running(child, log.to_owned())
}

/// An unprivileged Vault sidecar (as `nobody`) with the config `vault` provider section
/// pointing at `bao` and `token_file`, polling every `poll`, writing `files` (YAML list items)
/// to `shared/secrets`; waits until it is ready. Returns it, with its output directory.
fn vault_sidecar(
    d: &Path,
    bao: &Bao,
    token_file: &Path,
    poll: &str,
    files: &str,
    env: &[(&str, &str)],
) -> (Running, PathBuf) {
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "provider:\n  vault: {{address: \"{}\", role: app, caFile: {}, tokenFile: {}}}\nvolume: {{pollInterval: {poll}}}\naudit: {{path: shared/audit.jsonl}}\nfiles:\n{files}",
            bao.addr,
            bao.ca.display(),
            token_file.display()
        ),
    )
    .unwrap();
    Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(d.join("shared"))
        .arg(&config)
        .status()
        .unwrap();
    let out_dir = d.join("shared/secrets");
    let health = format!("127.0.0.1:{}", common::node::free_port());
    let s = spawn(
        unprivileged(
            &[
                "sidecar",
                "--config",
                config.to_str().unwrap(),
                "--dir",
                out_dir.to_str().unwrap(),
                "--health-addr",
                &health,
            ],
            env,
        ),
        &d.join("sidecar.log"),
    );
    wait_for("ready", Duration::from_secs(30), || {
        http_status(&health, "/readyz").contains("200")
    });
    (s, out_dir)
}

/// `keybroker sidecar` as the test's own user (root).
fn sidecar_command(config: &Path, dir: &Path, health: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["sidecar", "--config"])
        .arg(config)
        .arg("--dir")
        .arg(dir)
        .args(["--health-addr", health]);
    c
}

/// The broker API's `Get` of `name`.
async fn broker_get(
    c: &mut keybroker_csi::broker_pb::broker_client::BrokerClient<tonic::transport::Channel>,
    name: &str,
) -> Result<tonic::Response<keybroker_csi::broker_pb::GetResponse>, tonic::Status> {
    c.get(keybroker_csi::broker_pb::GetRequest { name: name.into() })
        .await
}

fn http_status(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn init_and_sidecar_with_a_local_provider_write_rotate_and_notify() {
    require_root_and_fuse();
    let tmp = nobody_dir();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/db"), r#"{"password":"S3cret-sidecar-v1"}"#).unwrap();
    // An app that counts SIGUSR1s (a copy of bash, so its process name is "hupwatch"). USR1,
    // not HUP: a run under nohup ignores SIGHUP, and bash cannot trap a signal ignored at entry.
    // Copied by cp: a file this process held open for writing could be inherited by a child
    // another test spawns meanwhile, and then exec fails with ETXTBSY.
    assert!(
        Command::new("cp")
            .arg("/bin/bash")
            .arg(d.join("hupwatch"))
            .status()
            .unwrap()
            .success()
    );
    let hups = d.join("hups");
    let _app = Running(
        Command::new(d.join("hupwatch"))
            .arg("-c")
            .arg(format!(
                "trap 'echo hup >> {}' USR1; touch {}; while true; do sleep 0.05; done",
                hups.display(),
                d.join("app-ready").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        d.join("app.log"),
    );
    // Before its trap is set, the signal would end the app: wait until it says it is ready.
    wait_for("the app's trap", Duration::from_secs(120), || {
        d.join("app-ready").exists()
    });
    // A reload endpoint that counts POSTs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reload = format!("http://{}/-/reload", listener.local_addr().unwrap());
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let token_posts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let token_url = reload.replace("/-/reload", "/-/token");
    std::fs::write(d.join("secrets/tok"), "token-v1").unwrap();
    {
        let posts = posts.clone();
        let token_posts = token_posts.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = [0u8; 2048];
                let n = c.read(&mut buf).unwrap_or(0);
                if buf[..n].starts_with(b"POST /-/reload") {
                    posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                } else if buf[..n].starts_with(b"POST /-/token") {
                    token_posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
    }
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "provider: {{local: {{path: secrets}}}}\nvolume: {{pollInterval: 1s}}\naudit: {{path: shared/audit.jsonl}}\nfiles:\n  - {{name: password, object: db, key: password}}\n  - name: token\n    object: tok\n    onChange:\n      - http: {{url: \"{token_url}\"}}\nonChange:\n  - signal: {{process: hupwatch, signal: USR1}}\n  - http: {{url: \"{reload}\"}}\n  - signal: {{process: nosuchapp}}\n"
        ),
    )
    .unwrap();
    Command::new("chown")
        .args([&format!("{NOBODY}:{NOBODY}")])
        .arg(&config)
        .status()
        .unwrap();
    let out_dir = d.join("shared/secrets");

    // init: once, then exit 0.
    common::output_ok(&mut unprivileged_init(&config, &out_dir, &[], &[]));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("password")).unwrap(),
        "S3cret-sidecar-v1"
    );
    assert!(out_dir.join("..data").is_symlink());
    // The audit records on stdout, for the log pipeline: a chain `audit verify` accepts.
    let stdout_dir = d.join("shared/stdout");
    let out = common::output_ok(&mut unprivileged_init(
        &config,
        &stdout_dir,
        &["--audit-log", "-"],
        &[],
    ));
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        lines.lines().count() >= 2 && lines.lines().all(|l| l.starts_with('{')),
        "{lines}"
    );
    assert!(!lines.contains("S3cret-sidecar"));
    let copy = d.join("stdout-audit.jsonl");
    std::fs::write(&copy, &lines).unwrap();
    let v = Command::new(BIN)
        .args(["audit", "verify", "--allow-missing-head"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(
        Command::new(BIN)
            .args(["probe", "--dir"])
            .arg(&out_dir)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        !Command::new(BIN)
            .args(["probe", "--dir"])
            .arg(d)
            .status()
            .unwrap()
            .success()
    );

    // sidecar: ready after the first write, then rotation with notices. It signals the app,
    // so it runs as the app's user here (root); the no-privilege run is the Vault test's.
    let port = common::node::free_port();
    let health = format!("127.0.0.1:{port}");
    let s = spawn(
        sidecar_command(&config, &out_dir, &health),
        &d.join("sidecar.log"),
    );
    wait_for("ready", Duration::from_secs(120), || {
        http_status(&health, "/readyz").contains("200")
    });
    std::fs::write(d.join("secrets/db"), r#"{"password":"S3cret-sidecar-v2"}"#).unwrap();
    wait_for("rotation", Duration::from_secs(120), || {
        std::fs::read_to_string(out_dir.join("password")).unwrap_or_default() == "S3cret-sidecar-v2"
    });
    let notified = || {
        std::fs::read_to_string(&hups)
            .unwrap_or_default()
            .lines()
            .count()
            == 1
            && posts.load(std::sync::atomic::Ordering::SeqCst) == 1
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !notified() {
        assert!(
            Instant::now() < deadline,
            "no notice: hups {:?}, posts {}\n{}\n{}",
            std::fs::read_to_string(&hups),
            posts.load(std::sync::atomic::Ordering::SeqCst),
            s.logs(),
            std::fs::read_to_string(d.join("shared/audit.jsonl")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The token file did not change: its own action did not run.
    assert_eq!(token_posts.load(std::sync::atomic::Ordering::SeqCst), 0);
    std::fs::write(d.join("secrets/tok"), "token-v2").unwrap();
    wait_for(
        "the token file's own notice",
        Duration::from_secs(10),
        || token_posts.load(std::sync::atomic::Ordering::SeqCst) == 1,
    );
    // The token's change was a second rotation of the volume (one more SIGHUP and POST);
    // nothing more without another change.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(&hups).unwrap().lines().count(),
        2,
        "{}",
        s.logs()
    );
    assert_eq!(posts.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(token_posts.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The missing process is an audited failure, and the sidecar still runs.
    let audit = std::fs::read_to_string(d.join("shared/audit.jsonl")).unwrap();
    assert!(
        audit.contains("nosuchapp") && audit.contains("shareProcessNamespace"),
        "{audit}"
    );
    assert!(!audit.contains("S3cret-sidecar"));
    assert!(http_status(&health, "/healthz").contains("200"));
    drop(s);
}

#[test]
fn vault_as_an_unprivileged_sidecar_follows_kubelets_token_rotation() {
    require_root_and_fuse();
    let tmp = nobody_dir();
    let d = tmp.path();
    let issuer = Issuer::new(d);
    let bao = Bao::with_jwt_role(d, &issuer, "team-a:app", common::peers::READ_APP_SECRETS);
    bao.cli(&[
        "kv",
        "put",
        "secret/app/db",
        "password=S3cret-vault-sidecar-v1",
    ]);
    let token = |i: u32| {
        issuer.token(&TokenSpec {
            ns: "team-a",
            sa: "app",
            pod: "app-0",
            uid: &format!("00000000-0000-0000-0000-{i:012}"),
            audience: "vault",
            expires_in: 3600,
        })
    };
    let token_file = d.join("shared/token");
    std::fs::write(&token_file, token(1)).unwrap();
    let (s, out_dir) = vault_sidecar(
        d,
        &bao,
        &token_file,
        "1s",
        "  - {name: password, object: secret/data/app/db, key: password}\n",
        &[
            ("POD_NAMESPACE", "team-a"),
            ("POD_NAME", "app-0"),
            ("POD_SERVICE_ACCOUNT", "app"),
        ],
    );
    // The process has no capabilities and is not root.
    let pid = s.0.id();
    let status = wait_status(pid);
    assert!(status.contains(&format!("Uid:\t{NOBODY}")), "{status}");
    for cap in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(status.contains(cap), "{cap} in {status}");
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join("password")).unwrap(),
        "S3cret-vault-sidecar-v1"
    );
    // kubelet rewrites the token file; a KV rotation reaches the file.
    std::fs::write(&token_file, token(2)).unwrap();
    bao.cli(&[
        "kv",
        "put",
        "secret/app/db",
        "password=S3cret-vault-sidecar-v2",
    ]);
    wait_for("KV rotation", Duration::from_secs(120), || {
        std::fs::read_to_string(out_dir.join("password")).unwrap_or_default()
            == "S3cret-vault-sidecar-v2"
    });
    // Vault down: the last good file stays.
    drop(bao);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("password")).unwrap(),
        "S3cret-vault-sidecar-v2"
    );
    let audit = std::fs::read_to_string(d.join("shared/audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"namespace\":\"team-a\""),
        "pod identity from the downward API"
    );
    assert!(!audit.contains("S3cret-vault-sidecar") && !audit.contains("eyJ"));
    assert!(!s.logs().contains("S3cret-vault-sidecar") && !s.logs().contains("eyJ"));
}

fn wait_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_the_workload_identity_environment_reads_key_vault() {
    require_root_and_fuse();
    let tmp = nobody_dir();
    let d = tmp.path().to_owned();
    let standin = AzureStandin::start(&d, &[]);
    let mut issuer = Issuer::new(&d);
    issuer.serve_discovery(&d);
    let (tenant, app) = (TENANT, APP);
    standin.workload_identity(&issuer.iss, "team-a:api").await;
    standin
        .post(
            "vaults/kv1/secrets/api-key",
            json!({"value": "S3cret-azure-init-3131"}),
        )
        .await;
    let token_file = d.join("shared/azure-token");
    std::fs::write(
        &token_file,
        issuer.token(&TokenSpec {
            ns: "team-a",
            sa: "api",
            pod: "api-0",
            uid: "00000000-0000-0000-0000-000000000001",
            audience: "api://AzureADTokenExchange",
            expires_in: 3600,
        }),
    )
    .unwrap();
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "provider:\n  azure: {{keyvaultName: kv1, keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: {}}}\naudit: {{path: shared/audit.jsonl}}\nfiles:\n  - {{name: api-key, object: secret/api-key}}\n",
            standin.https_port,
            standin.ca().display()
        ),
    )
    .unwrap();
    Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(d.join("shared"))
        .arg(&config)
        .arg(d.join("azure"))
        .status()
        .unwrap();
    let out_dir = d.join("shared/secrets");
    // The workload identity webhook's environment.
    let env = [
        ("AZURE_TENANT_ID", tenant),
        ("AZURE_CLIENT_ID", app),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", &standin.authority()),
    ];
    common::output_ok(&mut unprivileged_init(&config, &out_dir, &[], &env));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("api-key")).unwrap(),
        "S3cret-azure-init-3131"
    );
    // A missing object: non-zero, naming it.
    std::fs::write(
        &config,
        format!(
            "provider:\n  azure: {{keyvaultName: kv1, keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: {}}}\naudit: {{path: shared/audit.jsonl}}\nfiles:\n  - {{name: other, object: secret/no-such-secret}}\n",
            standin.https_port,
            standin.ca().display()
        ),
    )
    .unwrap();
    let out = unprivileged_init(&config, &d.join("shared/other"), &[], &env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-secret"), "{err}");
}

/// The sidecar keeps dynamic values alive as the node does: a database credential lease is
/// renewed (the files keep working credentials; PostgreSQL accepts them) and a PKI certificate
/// with a 10 s TTL is reissued before it ends.
#[test]
fn the_sidecar_renews_database_credentials_and_reissues_certificates() {
    use common::peers::Postgres;
    require_root_and_fuse();
    let tmp = nobody_dir();
    let d = tmp.path();
    let issuer = Issuer::new(d);
    let bao = Bao::with_jwt_role(
        d,
        &issuer,
        "team-a:app",
        "path \"database/creds/app\" { capabilities = [\"read\"] }\npath \"pki/issue/web\" { capabilities = [\"update\"] }\npath \"sys/leases/renew\" { capabilities = [\"update\"] }\n",
    );
    let pg = Postgres::start(d);
    bao.enable_database(&pg, "6s", "1h");
    bao.enable_pki("1h");
    let token_file = d.join("shared/token");
    std::fs::write(
        &token_file,
        issuer.token(&TokenSpec {
            ns: "team-a",
            sa: "app",
            pod: "app-0",
            uid: "00000000-0000-0000-0000-000000000009",
            audience: "vault",
            expires_in: 3600,
        }),
    )
    .unwrap();
    let (s, out_dir) = vault_sidecar(
        d,
        &bao,
        &token_file,
        "1h",
        "  - {name: username, object: database/creds/app, key: username}\n  - {name: password, object: database/creds/app, key: password}\n  - {name: tls.crt, object: pki/issue/web, key: certificate, method: POST, secretArgs: {common_name: api.example.test, ttl: 10s}}\n",
        &[],
    );
    let read = |f: &str| std::fs::read_to_string(out_dir.join(f)).unwrap_or_default();
    let (user, cert) = (read("username"), read("tls.crt"));
    assert!(
        user.starts_with("v-") && cert.contains("BEGIN CERTIFICATE"),
        "{user} {}",
        s.logs()
    );
    // Past the 6 s lease: renewed in place, so the same credentials still log in.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        read("username"),
        user,
        "a renewed lease keeps its credentials"
    );
    pg.login(&user, &read("password"))
        .unwrap_or_else(|e| panic!("credentials after renewals: {e}\n{}", s.logs()));
    // The 10 s certificate is reissued at 90% of its life.
    wait_for("a reissued certificate", Duration::from_secs(120), || {
        let c = read("tls.crt");
        c.contains("BEGIN CERTIFICATE") && c != cert
    });
    assert!(
        bao.requests(|_, p| p == "sys/leases/renew") >= 1,
        "the lease was renewed"
    );
}

/// The broker API on the sidecar's socket: Get, List and Watch for the allowed uid (a rotation
/// shows on Watch within the poll interval); another uid is refused by its kernel credentials
/// and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_api_serves_the_allowed_uid_and_refuses_others() {
    use keybroker_csi::broker_pb::{self as pb, broker_client::BrokerClient};
    require_root_and_fuse();
    let tmp = nobody_dir();
    let d = tmp.path().to_owned();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/db"), r#"{"password":"S3cret-broker-v1"}"#).unwrap();
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        "provider: {local: {path: secrets}}\nvolume: {pollInterval: 1s}\naudit: {path: shared/audit.jsonl}\nfiles:\n  - {name: password, object: db, key: password}\n",
    )
    .unwrap();
    let sock = d.join("shared/api.sock");
    let port = common::node::free_port();
    let health = format!("127.0.0.1:{port}");
    let s = spawn(
        {
            let mut c = sidecar_command(&config, &d.join("shared/secrets"), &health);
            c.args(["--api-uid", "0", "--api-socket"]).arg(&sock);
            c
        },
        &d.join("sidecar.log"),
    );
    wait_for("ready and serving", Duration::from_secs(120), || {
        http_status(&health, "/readyz").contains("200") && sock.exists()
    });
    let mut c = BrokerClient::new(keybroker_csi::connect_unix(&sock).await.unwrap());
    let got = broker_get(&mut c, "password").await.unwrap().into_inner();
    assert_eq!(got.value, b"S3cret-broker-v1");
    let list = c.list(pb::ListRequest {}).await.unwrap().into_inner();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].name, "password");
    let missing = broker_get(&mut c, "nope").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut watch = c
        .watch(pb::WatchRequest {
            names: vec!["password".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.version, got.version);
    std::fs::write(d.join("secrets/db"), r#"{"password":"S3cret-broker-v2"}"#).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a rotation on Watch within the poll interval")
        .unwrap()
        .unwrap();
    assert_eq!(next.name, "password");
    assert_ne!(next.version, first.version);
    let got = broker_get(&mut c, "password").await.unwrap().into_inner();
    assert_eq!(got.value, b"S3cret-broker-v2");
    assert_eq!(got.version, next.version);

    // Another uid (grpc-python as 65534): refused by its credentials, audited.
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(common::peers::peers_python())
        .arg("-c")
        .arg(format!(
            "import grpc\nch = grpc.insecure_channel('unix://{}')\nf = ch.unary_unary('/keybroker.v1.Broker/Get', request_serializer=lambda b: b, response_deserializer=lambda b: b)\ntry:\n    f(b'\\n\\x08password', timeout=10)\n    print('served')\nexcept grpc.RpcError as e:\n    print(e.code())\n",
            sock.display()
        ))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("PERMISSION_DENIED"),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit = std::fs::read_to_string(d.join("shared/audit.jsonl")).unwrap();
    assert!(
        audit.contains("uid 65534 may not use the broker API"),
        "{audit}"
    );
    assert!(audit.contains("broker Get"), "allowed reads are audited");
    assert!(!audit.contains("S3cret-broker"));
    drop(s);
}
