//! Azure: the Entra ID + Key Vault stand-in, shown faithful with Microsoft's own SDK.

mod common;

use common::azure::*;
use common::peers::peers_python;

/// Microsoft's Python SDK (azure-identity, azure-keyvault-secrets/-certificates/-keys, pinned by
/// scripts/install-peers.sh) gets tokens from the stand-in and reads and writes through it;
/// refusals surface as the SDK's exception types; a 429 is retried after Retry-After. The
/// script prints one line per check.
#[test]
fn microsofts_python_sdk_accepts_the_standin() {
    let tmp = common::open_tempdir();
    let standin = AzureStandin::start(tmp.path(), &[]);
    let out = std::process::Command::new(peers_python())
        .arg(standin_script("azure_conformance.py"))
        .arg(&standin.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}\nstand-in log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        standin.logs()
    );
    assert!(stdout.contains("conformance: Microsoft's Python SDK accepts the stand-in"));
    // Every check of the script ran (a check that stopped early fails above).
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count() >= 30,
        "{stdout}"
    );
}

use std::collections::HashMap;
use std::path::Path;

use common::node::*;
use common::peers::{Issuer, TokenSpec};
use common::*;
use reqwest::Method;
use serde_json::json;
use tonic::Code;

const TENANT: &str = "72f988bf-0000-4000-8000-00000000c0de";
const APP: &str = "11111111-2222-4333-8444-555555555555";
const MANAGED: &str = "77777777-2222-4333-8444-555555555555";
/// An app registered without any federated credential.
const NOFIC_APP: &str = "33333333-2222-4333-8444-555555555555";
const WI_AUDIENCE: &str = "api://AzureADTokenExchange";
const DB_V1: &str = "S3cret-azure-v1-7731";
const DB_V2: &str = "S3cret-azure-v2-9042";

struct World {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    standin: AzureStandin,
    issuer: Issuer,
    db_v1: String,
}

/// The stand-in with a tenant, an app with a federated credential for team-a/api, a managed
/// identity, vault kv1 (both may read) and kv2 (nobody may), and objects of every kind; the
/// issuer serving its discovery document; bindings for workload identity (team-a/api) and the
/// managed identity (team-b/batch).
async fn world() -> World {
    world_with(&[]).await
}

async fn world_with(standin_args: &[&str]) -> World {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    let standin = AzureStandin::start(&root, standin_args);
    let mut issuer = Issuer::new(&root);
    issuer.serve_discovery(&root);
    let s = &standin;
    s.post("tenants", json!({"tenant": TENANT})).await;
    s.post("apps", json!({"tenant": TENANT, "clientId": APP, "federated": [
        {"issuer": issuer.iss, "subject": "system:serviceaccount:team-a:api", "audiences": [WI_AUDIENCE]}]}))
        .await;
    s.post(
        "apps",
        json!({"tenant": TENANT, "clientId": NOFIC_APP, "federated": []}),
    )
    .await;
    s.post("managed", json!({"tenant": TENANT, "clientId": MANAGED}))
        .await;
    s.post("vaults", json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read", MANAGED: "read", NOFIC_APP: "read"}}))
        .await;
    s.post(
        "vaults",
        json!({"name": "kv2", "tenant": TENANT, "access": {}}),
    )
    .await;
    let v1 = s
        .post("vaults/kv1/secrets/db-password", json!({"value": DB_V1}))
        .await;
    let db_v1 = v1["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    s.post("vaults/kv1/secrets/db-password", json!({"value": DB_V2}))
        .await;
    s.post(
        "vaults/kv1/secrets/db-json",
        json!({"value": r#"{"username":"app","password":"S3cret-azure-json-5512"}"#}),
    )
    .await;
    s.post(
        "vaults/kv2/secrets/other",
        json!({"value": "S3cret-azure-kv2-0001"}),
    )
    .await;
    s.post(
        "vaults/kv1/certificates/tls",
        json!({"key": "rsa", "contentType": "application/x-pkcs12", "subject": "app.example"}),
    )
    .await;
    s.post(
        "vaults/kv1/keys/rsa-key",
        json!({"kty": "RSA", "key_size": 2048}),
    )
    .await;
    s.post(
        "vaults/kv1/keys/ec-key",
        json!({"kty": "EC", "crv": "P-256"}),
    )
    .await;
    let azure = |identity: &str| {
        format!(
            "{{azure: {{tenantID: {TENANT}, {identity}, authorityHost: \"{}\", keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: {}, keyvaults: [kv1, kv2]}}}}",
            s.authority(),
            s.https_port,
            s.ca().display()
        )
    };
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: team-a-wi\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {}\n    objects: [\"secret/*\", \"cert/*\", \"key/*\"]\n  - name: team-b-mi\n    namespace: team-b\n    serviceAccounts: [batch]\n    identity: {}\n    objects: [\"secret/db-*\"]\n  - name: team-a-nofic\n    namespace: team-a\n    serviceAccounts: [worker]\n    identity: {}\n    objects: [\"secret/*\"]\n",
            azure(&format!("clientID: {APP}")),
            azure(&format!("managedIdentity: {{clientID: {MANAGED}}}")),
            azure(&format!("clientID: {NOFIC_APP}"))
        ),
    );
    World {
        _tmp: tmp,
        root,
        standin,
        issuer,
        db_v1,
    }
}

/// The Secrets Store Azure provider's `objects` parameter: an `array` of YAML documents.
fn objects(docs: &[&str]) -> String {
    let mut s = String::from("array:\n");
    for d in docs {
        s.push_str("  - |\n");
        for line in d.lines() {
            s.push_str(&format!("    {line}\n"));
        }
    }
    s
}

impl World {
    fn daemon(&self) -> Daemon {
        let imds = format!("http://127.0.0.1:{}", self.standin.http_port);
        Daemon::start_opts(
            &self.root,
            "2s",
            &self.root.join("audit.jsonl"),
            &["--azure-imds", &imds],
        )
    }

    /// A publish for `pod` with kubelet's tokens for `audiences` (signed by the issuer, or by
    /// another key when `forged`), and the volume attributes `attrs`.
    fn request(
        &self,
        pod: &Pod,
        attrs: &[(&str, &str)],
        audiences: &[&str],
        expires_in: i64,
    ) -> keybroker_csi::pb::NodePublishVolumeRequest {
        let mut attrs = attrs.to_vec();
        attrs.push(("volumeType", "fuse"));
        let mut req = pod.request_with(&self.root, &attrs, None);
        let specs: Vec<TokenSpec> = audiences
            .iter()
            .map(|a| TokenSpec {
                ns: pod.ns,
                sa: pod.sa,
                pod: &pod.name,
                uid: &pod.uid,
                audience: a,
                expires_in,
            })
            .collect();
        req.secrets = HashMap::from([(
            "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
            self.issuer.kubelet_tokens(&specs),
        )]);
        req
    }
}

/// Ten secrets `PREFIX-0` .. `PREFIX-9` in kv1 (values `S3cret-PREFIX-N-v1`), and the
/// `objects` attribute that asks for all of them.
/// The attributes of a workload identity volume of vault `kv1` (the test's app) reading `objs`.
fn wi_attrs(objs: &str) -> [(&'static str, &str); 3] {
    [
        ("keyvaultName", "kv1"),
        ("clientID", APP),
        ("objects", objs),
    ]
}

impl World {
    /// A node of its own publishes a volume with `attrs` (no tokens: a managed identity) for
    /// `pod`, which reads the current `db-password`; then unpublishes it.
    async fn reads_db_password(&self, pod: &Pod, attrs: &[(&str, &str)]) {
        let d = self.daemon();
        let mut node = client(&d).await;
        node.node_publish_volume(self.request(pod, attrs, &[], 3600))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
        assert_eq!(read(&pod.target(&self.root).join("db-password")), DB_V2);
        node.node_unpublish_volume(pod.unpublish(&self.root))
            .await
            .unwrap();
    }

    /// Publishes a workload identity volume with `attrs` for each pod (1-h tokens).
    async fn publish_all(
        &self,
        node: &mut keybroker_csi::pb::node_client::NodeClient<tonic::transport::Channel>,
        d: &Daemon,
        pods: &[Pod],
        attrs: &[(&str, &str)],
    ) {
        for p in pods {
            node.node_publish_volume(self.request(p, attrs, &[WI_AUDIENCE], 3600))
                .await
                .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
        }
    }

    async fn unpublish_all(
        &self,
        node: &mut keybroker_csi::pb::node_client::NodeClient<tonic::transport::Channel>,
        pods: &[Pod],
    ) {
        for p in pods {
            node.node_unpublish_volume(p.unpublish(&self.root))
                .await
                .unwrap();
        }
    }
}

async fn ten_secrets(w: &World, prefix: &str) -> String {
    for i in 0..10 {
        w.standin
            .post(
                &format!("vaults/kv1/secrets/{prefix}-{i}"),
                json!({"value": format!("S3cret-{prefix}-{i}-v1")}),
            )
            .await;
    }
    let docs: Vec<String> = (0..10)
        .map(|i| format!("objectName: {prefix}-{i}"))
        .collect();
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    objects(&docs)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pod_reads_key_vault_objects_through_workload_identity() {
    let w = world().await;
    let d = w.daemon();
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 1);
    let version_pin = format!(
        "objectName: db-password\nobjectAlias: db-v1\nobjectVersion: {}",
        w.db_v1
    );
    let objs = objects(&[
        "objectName: db-password\nobjectType: secret",
        &version_pin,
        "objectName: db-json\nobjectAlias: db-user\nkey: username",
        "objectName: db-json\nobjectAlias: dsn\ntemplate: \"postgres://{{username}}:{{password}}@db\"",
        "objectName: tls\nobjectAlias: tls.pem\nobjectType: secret",
        "objectName: tls\nobjectAlias: tls.pfx\nobjectType: secret\nobjectFormat: pfx\nobjectEncoding: base64",
        "objectName: tls\nobjectAlias: tls.crt\nobjectType: cert",
        "objectName: rsa-key\nobjectType: key",
        "objectName: ec-key\nobjectType: key",
        "objectName: db-password\nobjectAlias: db-history\nobjectVersionHistory: 3",
    ]);
    let attrs = [
        ("keyvaultName", "kv1"),
        ("clientID", APP),
        ("tenantID", TENANT),
        ("objects", objs.as_str()),
    ];
    node.node_publish_volume(w.request(&pod, &attrs, &[WI_AUDIENCE], 3600))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = pod.target(&w.root);
    assert_eq!(read(&t.join("db-password")), DB_V2);
    assert_eq!(read(&t.join("db-v1")), DB_V1);
    assert_eq!(read(&t.join("db-user")), "app");
    assert_eq!(
        read(&t.join("dsn")),
        "postgres://app:S3cret-azure-json-5512@db"
    );
    let pem = read(&t.join("tls.pem"));
    assert!(pem.contains("-----BEGIN PRIVATE KEY-----"), "{pem:.60}");
    assert_eq!(
        pem.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "leaf and issuing CA"
    );
    let pfx = std::fs::read(t.join("tls.pfx")).unwrap();
    assert_eq!(pfx[0], 0x30, "a binary PKCS#12 (DER SEQUENCE)");
    let out = std::process::Command::new("openssl")
        .args(["pkcs12", "-nokeys", "-passin", "pass:", "-in"])
        .arg(t.join("tls.pfx"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "openssl reads the PFX: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Version history: a directory, 0 the newest; two versions exist, so no file 2.
    assert_eq!(read(&t.join("db-history/0")), DB_V2);
    assert_eq!(read(&t.join("db-history/1")), DB_V1);
    assert!(!t.join("db-history/2").exists());
    let mut listed: Vec<String> = std::fs::read_dir(t.join("db-history"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, ["0", "1"]);
    let crt = read(&t.join("tls.crt"));
    assert_eq!(crt.matches("-----BEGIN CERTIFICATE-----").count(), 1);
    assert!(!crt.contains("PRIVATE KEY"));
    for (file, kind) in [("rsa-key", "RSA"), ("ec-key", "EC")] {
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubin", "-noout", "-text", "-in"])
            .arg(t.join(file))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(if kind == "RSA" {
                "Public-Key: (2048 bit)"
            } else {
                "NIST CURVE: P-256"
            }),
            "{file}: {text}"
        );
    }
    // One token exchange for the identity, and it was the pod's token that was exchanged.
    let reqs = w.standin.requests().await;
    let exchanges: Vec<_> = reqs
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/oauth2/v2.0/token"))
        .collect();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    assert_eq!(exchanges[0]["status"], 200);
    assert_eq!(exchanges[0]["subject"], "system:serviceaccount:team-a:api");
    // No value and no token (JWTs start with eyJ) in the logs, the audit log or the state
    // directory.
    let mut places = vec![
        ("log".to_string(), d.logs()),
        ("audit".to_string(), read(&w.root.join("audit.jsonl"))),
    ];
    for e in walk(&w.root.join("state")) {
        places.push((
            e.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&e).unwrap()).into_owned(),
        ));
    }
    for (place, text) in &places {
        for planted in [DB_V1, DB_V2, "S3cret-azure-json-5512", "eyJ", "PRIVATE KEY"] {
            assert!(!text.contains(planted), "{planted:?} found in {place}");
        }
    }
    node.node_unpublish_volume(pod.unpublish(&w.root))
        .await
        .unwrap();

    // The same history in a tmpfs volume (kubelet's atomic-writer layout), and a rotation
    // that pushes the versions down.
    let pod = Pod::new("team-a", "api", 2);
    let objs =
        objects(&["objectName: db-password\nobjectAlias: db-history\nobjectVersionHistory: 2"]);
    let mut attrs = attrs.to_vec();
    attrs.retain(|(k, _)| *k != "objects");
    attrs.push(("objects", objs.as_str()));
    let mut req = w.request(&pod, &attrs, &[WI_AUDIENCE], 3600);
    req.volume_context
        .insert("volumeType".into(), "tmpfs".into());
    node.node_publish_volume(req).await.unwrap();
    let t = pod.target(&w.root);
    assert_eq!(read(&t.join("db-history/0")), DB_V2);
    assert_eq!(read(&t.join("db-history/1")), DB_V1);
    w.standin
        .post(
            "vaults/kv1/secrets/db-password",
            json!({"value": "S3cret-azure-v3-1177"}),
        )
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while read(&t.join("db-history/0")) != "S3cret-azure-v3-1177" {
        assert!(
            std::time::Instant::now() < deadline,
            "the new version did not arrive"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(read(&t.join("db-history/1")), DB_V2);
    node.node_unpublish_volume(pod.unpublish(&w.root))
        .await
        .unwrap();
}

/// Every regular file below `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_audited_and_skip_the_exchange_when_keybroker_can_tell() {
    let w = world().await;
    let d = w.daemon();
    let mut node = client(&d).await;
    let objs = objects(&["objectName: db-password"]);
    let attrs = |client: &'static str, vault: &'static str| {
        vec![
            ("keyvaultName", vault),
            ("clientID", client),
            ("objects", Box::leak(objs.clone().into_boxed_str()) as &str),
        ]
    };
    let expect = |r: Result<tonic::Response<_>, tonic::Status>, code: Code, text: &str| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(
            e.message().contains(text),
            "{text:?} not in {}",
            e.message()
        );
        e.message().to_owned()
    };
    let exchanges = || async {
        w.standin
            .requests()
            .await
            .iter()
            .filter(|r| r["path"].as_str().unwrap().ends_with("/oauth2/v2.0/token"))
            .count()
    };

    // A pod no binding selects.
    let stranger = Pod::new("team-c", "api", 10);
    let r = node
        .node_publish_volume(w.request(&stranger, &attrs(APP, "kv1"), &[WI_AUDIENCE], 3600))
        .await;
    expect(r, Code::PermissionDenied, "no binding selects");
    // A volume naming another client ID.
    let pod = Pod::new("team-a", "api", 11);
    let other = "99999999-0000-4000-8000-000000000000";
    let r = node
        .node_publish_volume(w.request(&pod, &attrs(other, "kv1"), &[WI_AUDIENCE], 3600))
        .await;
    expect(r, Code::PermissionDenied, "clientID");
    // No token for the exchange's audience (only one for another audience).
    let r = node
        .node_publish_volume(w.request(&pod, &attrs(APP, "kv1"), &["keybroker"], 3600))
        .await;
    expect(r, Code::FailedPrecondition, "api://AzureADTokenExchange");
    // An expired token: refused before any exchange.
    let r = node
        .node_publish_volume(w.request(&pod, &attrs(APP, "kv1"), &[WI_AUDIENCE], -600))
        .await;
    let e = r.expect_err("an expired token is refused");
    assert!(
        matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
        "{e:?}"
    );
    assert!(e.message().contains("expired"), "{}", e.message());
    // An unbound pod asking for the node's managed identity.
    let mi_attrs = vec![
        ("keyvaultName", "kv1"),
        ("useVMManagedIdentity", "true"),
        ("userAssignedIdentityID", MANAGED),
        ("objects", Box::leak(objs.clone().into_boxed_str()) as &str),
    ];
    let r = node
        .node_publish_volume(w.request(&pod, &mi_attrs, &[WI_AUDIENCE], 3600))
        .await;
    expect(r, Code::PermissionDenied, "managed identity");
    assert_eq!(
        exchanges().await,
        0,
        "keybroker refused all of these itself"
    );

    // A vault the identity may not read: Key Vault's 403 reaches the pod.
    let r = node
        .node_publish_volume(w.request(&pod, &attrs(APP, "kv2"), &[WI_AUDIENCE], 3600))
        .await;
    expect(r, Code::PermissionDenied, "Forbidden");
    node.node_unpublish_volume(pod.unpublish(&w.root))
        .await
        .ok();

    // A service account whose app has no federated credential: Entra's AADSTS70021.
    let worker = Pod::new("team-a", "worker", 12);
    let r = node
        .node_publish_volume(w.request(&worker, &attrs(NOFIC_APP, "kv1"), &[WI_AUDIENCE], 3600))
        .await;
    expect(r, Code::PermissionDenied, "AADSTS70021");
    // A forged token (right claims, another key): Entra's AADSTS50013.
    let forged = Pod::new("team-a", "api", 13);
    let mut forger = Issuer::new(&w.root.join("forger"));
    forger.iss = w.issuer.iss.clone();
    let forged_tokens = forger.kubelet_tokens(&[TokenSpec {
        ns: forged.ns,
        sa: forged.sa,
        pod: &forged.name,
        uid: &forged.uid,
        audience: WI_AUDIENCE,
        expires_in: 3600,
    }]);
    let forged_request = || {
        let mut req = w.request(&forged, &attrs(APP, "kv1"), &[WI_AUDIENCE], 3600);
        req.secrets.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            forged_tokens.clone(),
        );
        req
    };
    let msg = expect(
        node.node_publish_volume(forged_request()).await,
        Code::PermissionDenied,
        "AADSTS50013",
    );
    assert!(!msg.contains("eyJ"), "no token in the error: {msg}");
    // kubelet retries with the same token: Entra is not asked again.
    let before = exchanges().await;
    let r = node.node_publish_volume(forged_request()).await;
    expect(r, Code::PermissionDenied, "AADSTS50013");
    assert_eq!(
        exchanges().await,
        before,
        "a refused token is not exchanged again"
    );

    // A first mount while Key Vault fails (503), nothing cached: Unavailable, naming the vault
    // and the object, so kubelet retries.
    w.standin
        .post("faults", json!({"kind": "keyvault", "pathContains": "/secrets/db-json", "status": 503, "count": 1}))
        .await;
    let fresh = Pod::new("team-a", "api", 14);
    let json_attrs = vec![
        ("keyvaultName", "kv1"),
        ("clientID", APP),
        (
            "objects",
            Box::leak(objects(&["objectName: db-json"]).into_boxed_str()) as &str,
        ),
    ];
    let msg = expect(
        node.node_publish_volume(w.request(&fresh, &json_attrs, &[WI_AUDIENCE], 3600))
            .await,
        Code::Unavailable,
        "kv1",
    );
    assert!(msg.contains("db-json") && msg.contains("503"), "{msg}");
    node.node_publish_volume(w.request(&fresh, &json_attrs, &[WI_AUDIENCE], 3600))
        .await
        .expect("kubelet's retry succeeds once Key Vault answers");
    node.node_unpublish_volume(fresh.unpublish(&w.root))
        .await
        .unwrap();

    let audit = std::fs::read_to_string(w.root.join("audit.jsonl")).unwrap();
    for code in ["AADSTS70021", "AADSTS50013"] {
        assert!(audit.contains(code), "{code} is audited");
    }
    assert!(!audit.contains("eyJ"), "no token in the audit log");
    assert!(!d.logs().contains("eyJ"), "no token in the logs");
    assert!(
        d.metric("keybroker_denials_total") >= 7,
        "{}",
        d.metric("keybroker_denials_total")
    );
}

/// Managed identity: a pod of the binding that grants it reads through IMDS, and through the
/// App Service endpoint when the node is configured with one; the node asks for the granted
/// client_id only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_managed_identity_reads_through_imds_and_app_service() {
    let w = world().await;
    let objs = objects(&["objectName: db-password"]);
    let attrs = [
        ("keyvaultName", "kv1"),
        ("useVMManagedIdentity", "true"),
        ("userAssignedIdentityID", MANAGED),
        ("objects", objs.as_str()),
    ];
    w.reads_db_password(&Pod::new("team-b", "batch", 20), &attrs)
        .await;
    let imds = w.standin.requests_of("managed-identity").await;
    assert!(!imds.is_empty());
    // IMDS still starting (410) and throttling (429): retried, the volume is published.
    {
        w.standin
            .post(
                "faults",
                json!({"kind": "managed-identity", "status": 410, "count": 2}),
            )
            .await;
        w.standin
            .post(
                "faults",
                json!({"kind": "managed-identity", "status": 429, "retryAfter": 1, "count": 1}),
            )
            .await;
        w.reads_db_password(&Pod::new("team-b", "batch", 22), &attrs)
            .await;
        let statuses: Vec<u64> = w
            .standin
            .requests_of("managed-identity")
            .await
            .into_iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect();
        assert!(statuses.ends_with(&[410, 410, 429, 200]), "{statuses:?}");
        w.standin.admin(Method::DELETE, "faults", json!(null)).await;
    }
    assert!(
        imds.iter()
            .all(|r| r["path"] == "/metadata/identity/oauth2/token" && r["caller"] == MANAGED),
        "{imds:?}"
    );
    w.standin
        .admin(Method::DELETE, "requests", json!(null))
        .await;

    let endpoint = format!("http://127.0.0.1:{}/msi/token", w.standin.http_port);
    let d = Daemon::start_env(
        &w.root,
        "2s",
        &w.root.join("audit.jsonl"),
        &["--azure-identity-endpoint", &endpoint],
        &[("IDENTITY_HEADER", &w.standin.identity_header)],
    );
    let mut node = client(&d).await;
    let pod = Pod::new("team-b", "batch", 21);
    node.node_publish_volume(w.request(&pod, &attrs, &[], 3600))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    assert_eq!(read(&pod.target(&w.root).join("db-password")), DB_V2);
    let app_service = w.standin.requests_of("managed-identity").await;
    assert!(
        !app_service.is_empty()
            && app_service
                .iter()
                .all(|r| r["path"] == "/msi/token" && r["caller"] == MANAGED && r["status"] == 200),
        "{app_service:?}"
    );
    assert!(
        !d.logs().contains(&w.standin.identity_header),
        "the header secret is never logged"
    );
    node.node_unpublish_volume(pod.unpublish(&w.root))
        .await
        .unwrap();
}

/// 100 volumes of one identity sharing 10 objects cost one token exchange and one Key Vault GET
/// per object per rotation cycle, counted at the stand-in; a new version reaches the files
/// within the poll interval and is audited; a 429 window is waited out with the last good
/// values served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_fetches_rotation_and_throttling_counted_at_the_standin() {
    let w = world().await;
    let objs = ten_secrets(&w, "shared").await;
    let attrs = wi_attrs(&objs);
    let d = w.daemon();
    let mut node = client(&d).await;
    let pods: Vec<Pod> = (0..20)
        .map(|i| Pod::new("team-a", "api", 100 + i))
        .collect();
    w.publish_all(&mut node, &d, &pods, &attrs).await;
    let reqs = w.standin.requests().await;
    let gets = |reqs: &[serde_json::Value]| {
        reqs.iter()
            .filter(|r| r["kind"] == "keyvault" && r["status"] == 200)
            .count()
    };
    let exchanges = reqs
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/oauth2/v2.0/token"))
        .count();
    assert_eq!(
        exchanges, 1,
        "one exchange for the identity, not one per volume"
    );
    assert_eq!(gets(&reqs), 10, "one GET per object for 100 volumes");
    // Entra's and Key Vault's logs name keybroker (before the Azure SDK's own name on Key
    // Vault requests, as the SDK's application id).
    let version = env!("CARGO_PKG_VERSION");
    for r in &reqs {
        let ua = r["userAgent"].as_str().unwrap_or_default();
        let ok = match r["kind"].as_str() {
            Some("keyvault") => ua.starts_with(&format!("keybroker-node-{version} azsdk-rust-")),
            _ => ua == format!("keybroker/{version} (node)"),
        };
        assert!(ok, "{} {}: User-Agent {ua:?}", r["kind"], r["path"]);
    }

    // Rotation: a new version appears within the poll interval (2 s) in every volume.
    w.standin
        .post(
            "vaults/kv1/secrets/shared-3",
            json!({"value": "S3cret-shared-3-v2"}),
        )
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let all = pods
            .iter()
            .all(|p| read(&p.target(&w.root).join("shared-3")) == "S3cret-shared-3-v2");
        if all {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation did not arrive"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Per cycle: 10 GETs whatever the number of volumes.
    w.standin
        .admin(Method::DELETE, "requests", json!(null))
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let cycle = w.standin.requests().await;
    let per_cycle = gets(&cycle) as f64 / 10.0;
    assert!(
        (1.0..=4.0).contains(&per_cycle),
        "{} GETs in 5 s of 2 s polls for 10 objects and 100 volumes",
        gets(&cycle)
    );
    // Audited per volume, with the old and the new Key Vault version.
    let rotations: Vec<serde_json::Value> = audit_records(&w.root.join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == "rotate" && r["file"] == "shared-3")
        .collect();
    assert_eq!(rotations.len(), pods.len(), "{rotations:?}");
    for r in &rotations {
        let (old, new) = (
            r["previous_version"].as_str().unwrap(),
            r["version"].as_str().unwrap(),
        );
        assert!(old.len() == 32 && new.len() == 32 && old != new, "{r}");
    }

    // Throttling: Key Vault answers 429 (Retry-After: 3) for 4 s; files keep the last good
    // values, no request comes sooner than Retry-After after a 429, and it recovers.
    w.standin
        .admin(Method::DELETE, "requests", json!(null))
        .await;
    w.standin
        .post(
            "faults",
            json!({"kind": "keyvault", "status": 429, "retryAfter": 3, "seconds": 4}),
        )
        .await;
    w.standin
        .post(
            "vaults/kv1/secrets/shared-5",
            json!({"value": "S3cret-shared-5-v2"}),
        )
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        read(&pods[0].target(&w.root).join("shared-5")),
        "S3cret-shared-5-v1"
    );
    assert!(
        d.metric("keybroker_fetch_failures_total") > 0,
        "the 429s are counted"
    );
    assert!(
        d.metric("keybroker_stale_served_total") > 0,
        "staleness shows in the metrics"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while read(&pods[0].target(&w.root).join("shared-5")) != "S3cret-shared-5-v2" {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after the 429 window"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = w.standin.requests().await;
    let kv: Vec<&serde_json::Value> = log.iter().filter(|r| r["kind"] == "keyvault").collect();
    // Key Vault throttles per vault: after a 429 (Retry-After: 3) reached keybroker, no request
    // for any object of that vault goes out for 3 s. A request that arrives within 0.5 s of
    // the 429's answer may have been sent before keybroker read it (ten fetches run at once).
    let throttles: Vec<f64> = kv
        .iter()
        .filter(|r| r["status"] == 429)
        .filter_map(|r| r["answered"].as_f64())
        .collect();
    assert!(
        !throttles.is_empty(),
        "the window throttled some requests: {kv:?}"
    );
    for r in &kv {
        let t = r["t"].as_f64().unwrap();
        for &answered in &throttles {
            let after = t - answered;
            assert!(
                !(0.5..2.9).contains(&after),
                "{} requested {after:.2} s after a 429 for the vault (Retry-After: 3)",
                r["path"]
            );
        }
    }
    w.unpublish_all(&mut node, &pods).await;
}

/// A cold publish (the identity's provider was released with its last volume, so no token and
/// nothing cached) reuses the node's HTTPS connections to Entra and the vault: 12 requests (an
/// exchange, a bearer challenge, 10 GETs), the exchange over a connection the node already
/// has, and fewer new connections to the vault once its pool holds some. Each identity used to open connections of its own for every request that
/// went out together. (Over HTTP/1.1, as this stand-in speaks, the ten parallel GETs still need
/// as many connections as the pool lacks; over HTTP/2, as Key Vault speaks, one carries all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_publish_reuses_the_nodes_connections() {
    let w = world().await;
    let objs = ten_secrets(&w, "conn").await;
    let attrs = wi_attrs(&objs);
    let d = w.daemon();
    let mut node = client(&d).await;
    let mut counts = Vec::new();
    for i in 0..3 {
        let pod = Pod::new("team-a", "api", 400 + i);
        w.standin
            .admin(Method::DELETE, "requests", json!(null))
            .await;
        node.node_publish_volume(w.request(&pod, &attrs, &[WI_AUDIENCE], 3600))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
        let reqs = w.standin.requests().await;
        let fresh = reqs.iter().filter(|r| r["newConn"] == true).count();
        // The exchange, and the vault's first request (the challenge): each goes alone, so
        // each takes an idle connection when the node has one.
        let first_new = |kind: &str| {
            reqs.iter()
                .find(|r| r["kind"] == kind)
                .is_some_and(|r| r["newConn"] == true)
        };
        counts.push((reqs.len(), fresh, first_new("entra"), first_new("keyvault")));
        // The last volume of the identity: its token, clients and values are released.
        node.node_unpublish_volume(pod.unpublish(&w.root))
            .await
            .unwrap();
    }
    println!(
        "(requests, new connections, exchange on a new one, challenge on a new one) per cold publish: {counts:?}"
    );
    for (i, (reqs, _, exchange_new, _)) in counts.iter().enumerate() {
        assert_eq!(
            *reqs, 12,
            "cold publish {i}: exchange + challenge + 10 GETs"
        );
        if i > 0 {
            // Before, each identity had its own client, dropped with it: every cold publish
            // opened new connections (TCP + TLS) to Entra and to the vault.
            assert!(
                !exchange_new,
                "cold publish {i} opened a new connection to Entra: {counts:?}"
            );
        }
    }
    assert!(
        counts[2].1 < counts[0].1,
        "the node's pool serves later cold publishes: {counts:?}"
    );
}

/// Key Vault may give any object a new version at any moment, whatever its expiry: a secret
/// with a one-year `exp` (as Azure Policy often requires) and a certificate (whose attributes
/// always carry its notAfter) are polled like every other object, so a new version reaches the
/// volume within the poll interval (it used to wait for 90% of the year).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_with_an_expiry_still_rotate_at_the_poll_interval() {
    let w = world().await;
    let year = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 365 * 86_400
    };
    // A version of the secret (with a one-year expiry) and a new certificate.
    let new_versions = |value: &'static str| {
        let s = &w.standin;
        let exp = year();
        async move {
            s.post(
                "vaults/kv1/secrets/expiring",
                json!({"value": value, "attributes": {"exp": exp}}),
            )
            .await;
            s.post(
                "vaults/kv1/certificates/rotating",
                json!({"key": "rsa", "subject": "rotating.example"}),
            )
            .await;
        }
    };
    new_versions("S3cret-expiring-v1").await;
    let objs = objects(&[
        "objectName: expiring",
        "objectName: rotating\nobjectType: cert",
    ]);
    let attrs = wi_attrs(&objs);
    let d = w.daemon();
    let mut node = client(&d).await;
    let pod = Pod::new("team-a", "api", 300);
    node.node_publish_volume(w.request(&pod, &attrs, &[WI_AUDIENCE], 3600))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let t = pod.target(&w.root);
    assert_eq!(read(&t.join("expiring")), "S3cret-expiring-v1");
    let cert_v1 = read(&t.join("rotating"));
    assert!(cert_v1.starts_with("-----BEGIN CERTIFICATE-----"));
    // New versions of both, the secret with an expiry again.
    new_versions("S3cret-expiring-v2").await;
    // The poll is 2 s; the bound only keeps a broken build from hanging the suite.
    let took = wait_for(
        "new versions of the expiring secret and the certificate in the volume",
        std::time::Duration::from_secs(120),
        || {
            read(&t.join("expiring")) == "S3cret-expiring-v2"
                && read(&t.join("rotating")) != cert_v1
        },
    );
    println!("both rotated {took:?} after their new versions (poll 2 s)");
    let rotations = audit_records(&w.root.join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["event"] == "rotate")
        .count();
    assert!(rotations >= 2, "the rotations are audited");
    node.node_unpublish_volume(pod.unpublish(&w.root))
        .await
        .unwrap();
}

/// The identity's token is refreshed in the background before it expires (half-life for a
/// short token), one exchange each time whatever the number of volumes; while Entra is down
/// the last good token keeps Key Vault reads going until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_refresh_in_the_background_and_the_last_good_one_rides_out_an_entra_outage() {
    let w = world_with(&["--token-lifetime", "8"]).await;
    let objs = objects(&["objectName: db-password"]);
    let attrs = wi_attrs(&objs);
    let d = w.daemon();
    let mut node = client(&d).await;
    let pods: Vec<Pod> = (0..5).map(|i| Pod::new("team-a", "api", 300 + i)).collect();
    w.publish_all(&mut node, &d, &pods, &attrs).await;
    let exchanges = || async {
        w.standin
            .requests()
            .await
            .iter()
            .filter(|r| r["kind"] == "entra" && r["status"] == 200)
            .map(|r| r["t"].as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    // 8 s tokens are refreshed at half-life: over ~9 s, 2 or 3 exchanges in all, not one per
    // volume or per read.
    tokio::time::sleep(std::time::Duration::from_secs(9)).await;
    let ex = exchanges().await;
    assert!((2..=3).contains(&ex.len()), "{ex:?}");
    // Entra down (for longer than this test waits) right after a refresh: Key Vault reads go
    // on with the token in hand.
    w.standin
        .post(
            "faults",
            json!({"kind": "entra", "status": 503, "seconds": 600}),
        )
        .await;
    let outage_from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    w.standin
        .post(
            "vaults/kv1/secrets/db-password",
            json!({"value": "S3cret-azure-v3-during-outage"}),
        )
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while read(&pods[0].target(&w.root).join("db-password")) != "S3cret-azure-v3-during-outage" {
        assert!(
            std::time::Instant::now() < deadline,
            "no rotation while Entra was down: {}",
            d.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        w.standin
            .requests()
            .await
            .iter()
            .filter(|r| r["kind"] == "entra")
            .all(|r| r["status"] != 200 || r["t"].as_f64().unwrap() < outage_from),
        "Entra answered during the outage: the rotation did not ride on the token in hand"
    );
    w.standin.admin(Method::DELETE, "faults", json!(null)).await;
    w.unpublish_all(&mut node, &pods).await;
}
