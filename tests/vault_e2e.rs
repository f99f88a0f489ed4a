//! The Vault provider against real peers: OpenBao (`bao server -dev`, TLS with its own CA, JWT
//! auth trusting the test's service-account issuer, a file audit device that counts requests)
//! and PostgreSQL (dynamic database credentials). kubelet is played by a gRPC client on the CSI
//! socket; pods read the files as uid 65534.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::node::*;
use common::peers::*;
use common::*;
use keybroker_csi::pb;
use tonic::Code;

const NOBODY: u32 = 65534;
const NS: &str = "team-v";

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bao: Bao,
    issuer: Issuer,
}

/// OpenBao with JWT auth trusting the issuer, role `app` for `team-v/app`, KV v2 at `secret/`,
/// KV v1 at `kv1/`, and keybroker's bindings for the pods the tests use.
fn setup(extra_policy: &str, extra_objects: &[&str]) -> Setup {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    let issuer = Issuer::new(&root);
    let bao = Bao::with_jwt_role(
        &root,
        &issuer,
        &format!("{NS}:app"),
        &format!(
            "path \"secret/data/app/*\" {{ capabilities = [\"read\"] }}\npath \"kv1/app/*\" {{ capabilities = [\"read\"] }}\npath \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}\n{extra_policy}"
        ),
    );
    bao.cli(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    let mut objects = vec!["secret/app/*", "secret/data/app/*", "kv1/app/*"];
    objects.extend_from_slice(extra_objects);
    let objects = format!("{objects:?}");
    let binding = |name: &str, sa: &str, extra: &str| {
        format!(
            "  - name: {name}\n    namespace: {NS}\n    serviceAccounts: [{sa}]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, caFile: \"{}\"{extra}}}}}\n    objects: {objects}\n",
            bao.addr,
            bao.ca.display()
        )
    };
    let mut yaml = String::from("bindings:\n");
    yaml += &binding("team-v-app", "app", "");
    // Bound by keybroker to role app, but Vault's role accepts only team-v/app's tokens.
    yaml += &binding("team-v-rogue", "rogue", "");
    // Verifies Vault's certificate for a name it does not carry.
    yaml += &binding(
        "team-v-badtls",
        "badtls",
        ", tlsServerName: vault.wrong.example",
    );
    // Verifies it for a name it does carry while connecting to 127.0.0.1.
    yaml += &binding("team-v-sni", "sni", ", tlsServerName: localhost");
    common::write_bindings(&root, &yaml);
    Setup {
        _tmp: tmp,
        root,
        bao,
        issuer,
    }
}

struct VPod {
    sa: &'static str,
    name: String,
    uid: String,
}

impl VPod {
    fn new(sa: &'static str, i: usize) -> Self {
        VPod {
            sa,
            name: format!("{sa}-{i}"),
            uid: format!("11111111-0000-0000-0000-{i:012}"),
        }
    }

    fn target(&self, root: &Path) -> PathBuf {
        root.join(format!(
            "kubelet/pods/{}/volumes/kubernetes.io~csi/vault/mount",
            self.uid
        ))
    }

    fn tokens(&self, issuer: &Issuer) -> String {
        issuer.kubelet_tokens(&[TokenSpec {
            ns: NS,
            sa: self.sa,
            pod: &self.name,
            uid: &self.uid,
            audience: "vault",
            expires_in: 3600,
        }])
    }

    fn request(
        &self,
        s: &Setup,
        objects: &str,
        extra: &[(&str, &str)],
    ) -> pb::NodePublishVolumeRequest {
        let mut ctx: HashMap<String, String> = [
            ("csi.storage.k8s.io/pod.name", self.name.as_str()),
            ("csi.storage.k8s.io/pod.namespace", NS),
            ("csi.storage.k8s.io/pod.uid", self.uid.as_str()),
            ("csi.storage.k8s.io/serviceAccount.name", self.sa),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("roleName", "app"),
            ("vaultAddress", s.bao.addr.as_str()),
            ("vaultAuthMountPath", "jwt"),
            ("volumeType", "tmpfs"),
            ("objects", objects),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            ctx.insert(k.to_string(), v.to_string());
        }
        pb::NodePublishVolumeRequest {
            volume_id: format!("csi-{}", self.uid),
            target_path: self.target(&s.root).display().to_string(),
            volume_capability: Some(pb::VolumeCapability {
                access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
                access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
            }),
            readonly: true,
            volume_context: ctx,
            secrets: HashMap::from([(
                "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
                self.tokens(&s.issuer),
            )]),
            ..Default::default()
        }
    }

    fn unpublish(&self, root: &Path) -> pb::NodeUnpublishVolumeRequest {
        pb::NodeUnpublishVolumeRequest {
            volume_id: format!("csi-{}", self.uid),
            target_path: self.target(root).display().to_string(),
        }
    }
}

fn cat(path: &Path) -> String {
    let (ok, out, err) = run_as(NOBODY, NOBODY, "cat", &[path.to_str().unwrap()]);
    assert!(ok, "cat {}: {err}", path.display());
    out
}

fn is_login(_op: &str, path: &str) -> bool {
    path == "auth/jwt/login"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_reads_as_the_pod_with_one_login_and_deduplicated_reads() {
    let s = setup("", &[]);
    s.bao.cli(&[
        "kv",
        "put",
        "secret/app/config",
        "user=app",
        "password=S3cret-kv-v1-old",
    ]);
    s.bao.cli(&[
        "kv",
        "put",
        "secret/app/config",
        "user=app",
        "password=S3cret-kv-v2-new",
    ]);
    s.bao
        .cli(&["write", "kv1/app/legacy", "token=S3cret-kv1-legacy"]);
    for i in 0..10 {
        s.bao.cli(&[
            "kv",
            "put",
            &format!("secret/app/k{i}"),
            &format!("value=S3cret-shared-{i}"),
        ]);
    }
    let d = Daemon::start_with(&s.root, "2s");
    let mut node = client(&d).await;

    // A bound pod reads KV v2 (whole, one key, a pinned version) and KV v1, as a non-root uid.
    let a = VPod::new("app", 1);
    let objects = "- objectName: config.json\n  secretPath: secret/app/config\n- objectName: password\n  secretPath: secret/app/config\n  secretKey: password\n- objectName: old-password\n  secretPath: secret/data/app/config?version=1\n  secretKey: password\n- objectName: legacy\n  secretPath: kv1/app/legacy\n  secretKey: token\n";
    node.node_publish_volume(a.request(&s, objects, &[]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = a.target(&s.root);
    let config: serde_json::Value = serde_json::from_str(&cat(&t.join("config.json"))).unwrap();
    assert_eq!(config["password"], "S3cret-kv-v2-new");
    assert_eq!(cat(&t.join("password")), "S3cret-kv-v2-new");
    assert_eq!(cat(&t.join("old-password")), "S3cret-kv-v1-old");
    assert_eq!(cat(&t.join("legacy")), "S3cret-kv1-legacy");
    assert_eq!(s.bao.requests(is_login), 1);
    // Vault's audit log names keybroker and its mode on every request it sent.
    assert_eq!(
        s.bao.user_agents(),
        [format!("keybroker/{} (node)", env!("CARGO_PKG_VERSION"))].into(),
        "User-Agent of keybroker's requests in OpenBao's audit log"
    );

    // An unbound pod is refused by keybroker: Vault never sees it.
    let before = s.bao.requests(|_, _| true);
    let other = VPod::new("other", 2);
    let err = node
        .node_publish_volume(other.request(&s, objects, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("team-v/other-2"),
        "{}",
        err.message()
    );
    assert_eq!(
        s.bao.requests(|_, _| true),
        before,
        "Vault saw the unbound pod"
    );

    // A pod keybroker binds but Vault's role refuses: a clear error naming pod, role and
    // path, never the token.
    let rogue = VPod::new("rogue", 3);
    let req = rogue.request(&s, objects, &[]);
    let rogue_jwt = req.secrets.values().next().unwrap().clone();
    let err = node.node_publish_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let msg = err.message();
    for want in [
        "team-v/rogue-3",
        "role \"app\"",
        "auth/jwt/login",
        "Vault rejected",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    let jwt: serde_json::Value = serde_json::from_str(&rogue_jwt).unwrap();
    let jwt = jwt["vault"]["token"].as_str().unwrap();
    assert!(!msg.contains(jwt.split('.').nth(1).unwrap()), "{msg}");
    assert!(!is_mount_point(&rogue.target(&s.root)));
    // Vault's refusal of the pod's identity is a denial: counted and audited as one, with
    // Vault's reason code (the unbound pod above was the first).
    assert_eq!(d.metric("keybroker_denials_total"), 2, "{}", d.logs());
    assert_eq!(d.metric("keybroker_publish_errors_total"), 0);
    let deny = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let found = audit_records(&s.root.join("audit.jsonl"))
                .into_iter()
                .find(|r| r["event"] == "deny" && r["pod"]["name"] == "rogue-3");
            if let Some(r) = found {
                break r;
            }
            assert!(Instant::now() < deadline, "no deny record for rogue-3");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(deny["outcome"], "denied");
    assert!(
        deny["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("vault-login-refused-")),
        "{deny}"
    );

    // Vault's certificate checked against a name it does not carry: refused, clearly.
    let badtls = VPod::new("badtls", 4);
    let err = node
        .node_publish_volume(badtls.request(&s, objects, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("cannot reach Vault") && err.message().contains("certificate"),
        "{}",
        err.message()
    );

    // The right server name: TLS succeeds, and Vault itself answers (its role refuses `sni`).
    let err = node
        .node_publish_volume(VPod::new("sni", 6).request(&s, objects, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("Vault rejected the login"),
        "{}",
        err.message()
    );

    // A missing secret: not found, naming the path.
    let err = node
        .node_publish_volume(VPod::new("app", 5).request(
            &s,
            "- objectName: x\n  secretPath: secret/app/missing\n",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("secret/app/missing") && err.message().contains("not found"));

    // A KV change shows up within the poll interval (2 s, +10% jitter).
    s.bao.cli(&[
        "kv",
        "put",
        "secret/app/config",
        "user=app",
        "password=S3cret-kv-v3-rotated",
    ]);
    let took = wait_for("the rotated password", Duration::from_secs(120), || {
        cat(&t.join("password")) == "S3cret-kv-v3-rotated"
    });
    println!("KV change visible after {took:?} (poll 2 s)");
    assert_eq!(
        cat(&t.join("old-password")),
        "S3cret-kv-v1-old",
        "a pinned version stays"
    );

    // kubelet's republish (every minute, with fresh tokens) is cheap: no Vault request. The
    // volume's own 2 s poll may land in the window, so a window without any request within
    // three tries shows it (a republish that cost a request would spoil all three).
    let mut quiet = false;
    for _ in 0..3 {
        let before = s.bao.requests(|_, _| true);
        node.node_publish_volume(a.request(&s, objects, &[]))
            .await
            .unwrap();
        if s.bao.requests(|_, _| true) == before {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "every republish was accompanied by a Vault request");

    // 100 volumes of one identity sharing 10 KV objects: 10 reads, no new login.
    let reads = |s: &Setup| {
        s.bao
            .requests(|op, p| op == "read" && p.starts_with("secret/data/app/k"))
    };
    let shared: String = (0..10)
        .map(|i| format!("- objectName: k{i}\n  secretPath: secret/app/k{i}\n  secretKey: value\n"))
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let req = VPod::new("app", 100 + i).request(&s, &shared, &[]);
        let mut n = node.clone();
        tasks.push(tokio::spawn(
            async move { n.node_publish_volume(req).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let publish_reads = reads(&s);
    let window_start = Instant::now();
    println!(
        "100 volumes x 10 objects published in {:?}: {publish_reads} Vault reads",
        started.elapsed()
    );
    assert_eq!(publish_reads, 10, "one read per object for 100 volumes");
    assert_eq!(
        cat(&VPod::new("app", 150).target(&s.root).join("k7")),
        "S3cret-shared-7"
    );
    // Refresh cycles: every volume refreshes every 2 s, the cache turns that into one read per
    // object per cycle (1,000 per cycle without it).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let cycles = window_start.elapsed().as_secs_f64() / 2.0;
    let cycle_reads = reads(&s) - publish_reads;
    println!("{cycle_reads} reads in {cycles:.1} poll cycles");
    assert!(
        (cycle_reads as f64) <= 10.0 * (cycles + 1.0),
        "{cycle_reads} reads in {cycles:.1} cycles"
    );
    assert!(cycle_reads >= 10, "the values were not refreshed");
    assert_eq!(
        s.bao.requests(is_login),
        3,
        "logins: app once, rogue once, sni once\n{}",
        d.logs()
            .lines()
            .filter(|l| l.contains("Vault"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Unpublishing the identity's last volume revokes its Vault token.
    for i in 0..100 {
        node.node_unpublish_volume(VPod::new("app", 100 + i).unpublish(&s.root))
            .await
            .unwrap();
    }
    assert_eq!(
        s.bao.requests(|_, p| p == "auth/token/revoke-self"),
        0,
        "pod app-1 still uses the token"
    );
    node.node_unpublish_volume(a.unpublish(&s.root))
        .await
        .unwrap();
    assert_eq!(s.bao.requests(|_, p| p == "auth/token/revoke-self"), 1);

    // Nothing secret in keybroker's logs, its audit log or its state.
    assert_no_secrets(
        &[
            "S3cret-kv-v1-old",
            "S3cret-kv-v2-new",
            "S3cret-kv-v3-rotated",
            "S3cret-kv1-legacy",
            "S3cret-shared-",
            jwt.split('.').nth(1).unwrap(),
        ],
        &[&s.root.join("audit.jsonl"), &s.root.join("state")],
        &[("node logs", &d.logs())],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_credentials_are_renewed_replaced_and_revoked() {
    let s = setup(
        "path \"database/creds/app\" { capabilities = [\"read\"] }\n",
        &["database/creds/app"],
    );
    let pg = Postgres::start(&s.root);
    s.bao.enable_database(&pg, "4s", "14s");
    let d = Daemon::start_with(&s.root, "30s");
    let mut node = client(&d).await;

    // Username, password and a connection string, all from one lease.
    let objects = format!(
        "- objectName: username\n  secretPath: database/creds/app\n  secretKey: username\n- objectName: password\n  secretPath: database/creds/app\n  secretKey: password\n- objectName: url\n  secretPath: database/creds/app\n  template: \"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable\"\n",
        pg.port
    );
    let app = VPod::new("app", 1);
    node.node_publish_volume(app.request(&s, &objects, &[]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = app.target(&s.root);
    let first_user = cat(&t.join("username"));
    assert_eq!(pg.try_login(&cat(&t.join("url"))).unwrap(), first_user);

    // The init container (another volume of the identity) sees the same credentials; a volume
    // that asks for its own gets its own.
    let init = VPod::new("app", 2);
    node.node_publish_volume(init.request(&s, &objects, &[]))
        .await
        .unwrap();
    assert_eq!(cat(&init.target(&s.root).join("username")), first_user);
    let own = VPod::new("app", 3);
    node.node_publish_volume(own.request(&s, &objects, &[("credentialScope", "volume")]))
        .await
        .unwrap();
    let own_user = cat(&own.target(&s.root).join("username"));
    assert_ne!(own_user, first_user);
    assert_eq!(s.bao.requests(|_, p| p == "database/creds/app"), 2);

    // Watch for 20 s (lease 4 s, max 14 s): every credential the file ever shows works, the
    // first one outlives its first TTL (renewed), and it is replaced before its max TTL.
    let started = Instant::now();
    let mut seen: Vec<(String, Duration, Duration)> = Vec::new();
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(20) {
        let (user, pass, url) = (
            cat(&t.join("username")),
            cat(&t.join("password")),
            cat(&t.join("url")),
        );
        let at = started.elapsed();
        if user != cat(&t.join("username")) {
            continue; // rotated between the reads: sample again
        }
        assert!(
            url.contains(&format!("{user}:{pass}@")),
            "files from different leases"
        );
        match pg.login(&user, &pass) {
            Ok(u) => assert_eq!(u, user),
            Err(e) => panic!("credentials in the file do not work at {at:?}: {e}"),
        }
        samples += 1;
        match seen.last_mut() {
            Some((u, _, last)) if *u == user => *last = at,
            _ => seen.push((user, at, at)),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "{samples} samples, credentials seen (user, first, last): {:?}",
        seen.iter()
            .map(|(u, a, b)| (u.as_str(), a.as_secs_f32(), b.as_secs_f32()))
            .collect::<Vec<_>>()
    );
    assert!(seen.len() >= 2, "credentials were never replaced: {seen:?}");
    assert_eq!(seen[0].0, first_user);
    assert!(
        seen[0].2 > Duration::from_secs(5),
        "the first lease was not renewed past its 4 s TTL: {seen:?}"
    );
    assert!(
        seen[0].2 < Duration::from_secs(14),
        "the first credentials outlived their max TTL: {seen:?}"
    );
    let renewals = s.bao.requests(|_, p| p == "sys/leases/renew");
    println!("lease renewals at Vault: {renewals}");
    assert!(renewals >= 2);

    // Unpublish: the shared lease goes with its last volume, the per-volume one with its volume,
    // and the identity's token with the identity's last volume. The users cannot log in.
    let (last_user, last_pass) = (cat(&t.join("username")), cat(&t.join("password")));
    let (own_pass,) = (cat(&own.target(&s.root).join("password")),);
    node.node_unpublish_volume(own.unpublish(&s.root))
        .await
        .unwrap();
    assert!(
        pg.login(&own_user, &own_pass).is_err(),
        "per-volume lease not revoked"
    );
    assert!(pg.login(&last_user, &last_pass).is_ok());
    node.node_unpublish_volume(init.unpublish(&s.root))
        .await
        .unwrap();
    node.node_unpublish_volume(app.unpublish(&s.root))
        .await
        .unwrap();
    let err = pg.login(&last_user, &last_pass).unwrap_err();
    println!("after unpublish: {}", err.trim());
    assert!(s.bao.requests(|_, p| p == "sys/leases/revoke") >= 2);
    assert_eq!(s.bao.requests(|_, p| p == "auth/token/revoke-self"), 1);
    assert_no_secrets(
        &[&last_pass, &own_pass, &pg.password],
        &[&s.root.join("audit.jsonl"), &s.root.join("state")],
        &[("node logs", &d.logs())],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_certificates_are_issued_and_reissued_at_90_percent() {
    let s = setup(
        "path \"pki/issue/web\" { capabilities = [\"update\"] }\n",
        &["pki/issue/web"],
    );
    s.bao.enable_pki("1h");
    let d = Daemon::start_with(&s.root, "30s");
    let mut node = client(&d).await;
    let args = "  method: POST\n  secretArgs: {common_name: api.example.test, ttl: 10s}\n";
    let objects = format!(
        "- objectName: tls.crt\n  secretPath: pki/issue/web\n  secretKey: certificate\n{args}- objectName: tls.key\n  secretPath: pki/issue/web\n  secretKey: private_key\n{args}- objectName: ca.crt\n  secretPath: pki/issue/web\n  secretKey: ca_chain\n{args}"
    );
    let app = VPod::new("app", 1);
    node.node_publish_volume(app.request(&s, &objects, &[]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = app.target(&s.root);
    let check = |t: &Path| -> String {
        // Read the three files from one snapshot, as an application of an atomic-writer
        // volume does (`..data` resolved once): a rotation may land between two opens.
        let snapshot = std::fs::canonicalize(t.join("..data")).unwrap();
        let t = snapshot.as_path();
        // The certificate is for the name asked, chains to the CA file, and matches the key.
        common::output_ok(
            std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(t.join("ca.crt"))
                .arg(t.join("tls.crt")),
        );
        let pubkey = |args: &[&str], f: &Path| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .arg(f)
                .output()
                .unwrap();
            assert!(o.status.success());
            o.stdout
        };
        assert_eq!(
            pubkey(&["x509", "-noout", "-pubkey", "-in"], &t.join("tls.crt")),
            pubkey(&["pkey", "-pubout", "-in"], &t.join("tls.key")),
            "certificate and key are from different issues"
        );
        let o = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-subject", "-in"])
            .arg(t.join("tls.crt"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(text.contains("api.example.test"), "{text}");
        text.lines().next().unwrap().to_owned()
    };
    let first = check(&t);
    assert_eq!(
        s.bao.requests(|_, p| p == "pki/issue/web"),
        1,
        "one issue for three files"
    );
    // A 10 s certificate is reissued at 90% of its life: after 9 s, before 10 s.
    let took = wait_for("a reissued certificate", Duration::from_secs(120), || {
        check(&t) != first
    });
    println!("certificate reissued after {took:?} (lifetime 10 s)");
    assert!(
        took > Duration::from_secs(7),
        "reissued too early: {took:?}"
    );
    let key = cat(&t.join("tls.key"));
    let key_body = key.lines().nth(3).unwrap().to_owned();
    node.node_unpublish_volume(app.unpublish(&s.root))
        .await
        .unwrap();
    assert_no_secrets(
        &[&key_body, "PRIVATE KEY"],
        &[&s.root.join("audit.jsonl"), &s.root.join("state")],
        &[("node logs", &d.logs())],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_tokens_are_renewed_replaced_and_errors_are_clear() {
    let s = setup("", &["secret/other/*"]);
    // Short Vault tokens: 4 s TTL, renewable up to 10 s.
    s.bao.jwt_role(
        None,
        "app",
        &format!("{NS}:app"),
        &["token_ttl=4s", "token_max_ttl=10s"],
    );
    s.bao
        .cli(&["kv", "put", "secret/app/cfg", "v=S3cret-upkeep-1"]);
    s.bao
        .cli(&["kv", "put", "secret/other/x", "v=S3cret-not-granted"]);
    let d = Daemon::start_with(&s.root, "1s");
    let mut node = client(&d).await;
    let a = VPod::new("app", 1);
    let objects = "- objectName: v\n  secretPath: secret/app/cfg\n  secretKey: v\n";
    node.node_publish_volume(a.request(&s, objects, &[]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = a.target(&s.root);

    // Over 16 s the token is renewed at 2/3 of its TTL and replaced by a new login near its
    // max TTL (about one login per 10 s), while reads keep working.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let renewals = s.bao.requests(|_, p| p == "auth/token/renew-self");
    let logins = s.bao.requests(is_login);
    println!("16 s with 4 s / 10 s max tokens: {renewals} renewals, {logins} logins");
    assert!(renewals >= 2, "{renewals} renewals\n{}", d.logs());
    assert!((2..=3).contains(&logins), "{logins} logins");
    s.bao
        .cli(&["kv", "put", "secret/app/cfg", "v=S3cret-upkeep-2"]);
    wait_for(
        "a read with the replaced token",
        Duration::from_secs(6),
        || cat(&t.join("v")) == "S3cret-upkeep-2",
    );

    // Vault forgets every token it issued (an operator revoking the auth mount's leases):
    // keybroker sees 403, confirms with lookup-self that its token is gone, logs in again.
    let logins = s.bao.requests(is_login);
    s.bao.cli(&["lease", "revoke", "-prefix", "auth/jwt/login"]);
    s.bao
        .cli(&["kv", "put", "secret/app/cfg", "v=S3cret-upkeep-3"]);
    wait_for("a read after re-login", Duration::from_secs(120), || {
        cat(&t.join("v")) == "S3cret-upkeep-3"
    });
    assert!(s.bao.requests(is_login) > logins);
    assert!(s.bao.requests(|_, p| p == "auth/token/lookup-self") >= 1);

    // Permission denied by Vault's policy (keybroker's binding allows the path): clear, naming
    // the pod, the path and the identity.
    let err = node
        .node_publish_volume(VPod::new("app", 2).request(
            &s,
            "- objectName: x\n  secretPath: secret/other/x\n  secretKey: v\n",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for want in [
        "team-v/app-2",
        "secret/other/x",
        "permission denied",
        "jwt/app",
    ] {
        assert!(
            err.message().contains(want),
            "{want:?} missing: {}",
            err.message()
        );
    }

    // A sealed Vault: Unavailable (kubelet retries), and the mounted volume keeps its content.
    s.bao.cli(&["operator", "seal"]);
    let err = node
        .node_publish_volume(VPod::new("app", 3).request(
            &s,
            "- objectName: y\n  secretPath: secret/app/never-read\n",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sealed"), "{}", err.message());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cat(&t.join("v")), "S3cret-upkeep-3");
    assert_no_secrets(
        &["S3cret-upkeep-", "S3cret-not-granted"],
        &[&s.root.join("audit.jsonl"), &s.root.join("state")],
        &[("node logs", &d.logs())],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_namespace_is_used_for_login_and_reads() {
    let s = setup("", &[]);
    let ns1 = Some("ns1");
    s.bao.cli(&["namespace", "create", "ns1"]);
    s.bao.cli_in(
        ns1,
        &["secrets", "enable", "-path=secret", "-version=2", "kv"],
    );
    s.bao.trust_issuer(ns1, &s.issuer);
    s.bao.jwt_role(ns1, "app", &format!("{NS}:app"), &[]);
    s.bao.policy(
        ns1,
        "app",
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n",
    );
    // The value exists only in namespace ns1.
    s.bao.cli_in(
        ns1,
        &[
            "kv",
            "put",
            "secret/app/only-in-ns1",
            "v=S3cret-in-namespace",
        ],
    );
    let mut yaml = std::fs::read_to_string(s.root.join("etc/bindings.yaml")).unwrap();
    yaml += &format!(
        "  - name: team-v-ns1\n    namespace: {NS}\n    serviceAccounts: [app]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, namespace: ns1, caFile: \"{}\"}}}}\n    objects: [\"secret/app/*\"]\n",
        s.bao.addr,
        s.bao.ca.display()
    );
    std::fs::write(s.root.join("etc/bindings.yaml"), yaml).unwrap();
    let d = Daemon::start(&s.root);
    let mut node = client(&d).await;
    let pod = VPod::new("app", 1);
    node.node_publish_volume(pod.request(
        &s,
        "- objectName: v\n  secretPath: secret/app/only-in-ns1\n  secretKey: v\n",
        &[("vaultNamespace", "ns1")],
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    assert_eq!(cat(&pod.target(&s.root).join("v")), "S3cret-in-namespace");
    node.node_unpublish_volume(pod.unpublish(&s.root))
        .await
        .unwrap();
}
