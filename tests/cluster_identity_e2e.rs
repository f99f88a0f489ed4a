//! Real identities in the real cluster (issue #23, parts 1 and 2). OpenBao and the Entra / Key
//! Vault stand-in run inside the test cluster's network namespace and trust the cluster's own
//! service-account tokens.
//!
//! OpenBao is set up the way Vault's documentation tells operators to:
//! - `jwt` auth with the apiserver as OIDC issuer (discovery and JWKS fetched from the
//!   apiserver, anonymous discovery allowed by the `system:service-account-issuer-discovery`
//!   ClusterRole bound to `system:unauthenticated`);
//! - `kubernetes` auth validating each token with a TokenReview against the apiserver (the
//!   reviewer a ServiceAccount with `system:auth-delegator`).
//!
//! kubelet requests each pod's token (audience `vault`, the chart's CSIDriver `tokenRequests`)
//! and passes it to keybroker in NodePublishVolume; keybroker logs in with it. A pod of each
//! method reads a KV secret, a database credential (PostgreSQL in the same namespace; the
//! credential logs in) and a PKI certificate (it chains to the mount's CA and matches its key);
//! a pod of a service account Vault's role does not name is refused by Vault, and the refusal
//! reaches the pod's `FailedMount` event as a denial. A pod whose Vault token lives 20 s sees
//! two rotations of its secret, the second after that token has expired (keybroker logs in
//! again with the pod's token from kubelet).
//!
//! The stand-in's app has a federated credential whose issuer is the apiserver's, and the
//! stand-in checks a pod's token with the keys it fetches from the apiserver's discovery
//! document and JWKS, as Entra does. The pod carries what the Azure workload identity webhook
//! injects; it reads a Key Vault secret and a certificate; a pod of another service account is
//! refused with AADSTS70021 in its event.

mod common;

use std::path::Path;

use common::azure::{APP, AzureStandin, TENANT};
use common::cluster::*;
use common::peers::{Bao, Postgres};

const SECRET: &str = "S3cret-from-bao-7781";
/// Where OpenBao listens: the node's address inside the cluster's network namespace.
const BAO_IP: &str = NODE_IP;
const KV_SECRET: &str = "S3cret-from-key-vault-4410";
const ORDERS_SECRET: &str = "S3cret-orders-init-5520";
const PAYMENTS_V1: &str = "S3cret-payments-v1-6601";
const PAYMENTS_V2: &str = "S3cret-payments-v2-6602";
const PAYMENTS_V3: &str = "S3cret-payments-v3-6603";
/// What kubelet's token for workload identity is requested for (the chart's CSIDriver).
const WI_AUDIENCE: &str = "api://AzureADTokenExchange";
/// A KV value, a database credential and a certificate with its key and CA.
const OBJECTS: &str = "- objectName: password\n  secretPath: secret/app/db\n  secretKey: password\n\
- objectName: db-user\n  secretPath: database/creds/app\n  secretKey: username\n\
- objectName: db-password\n  secretPath: database/creds/app\n  secretKey: password\n\
- objectName: tls.crt\n  secretPath: pki/issue/web\n  secretKey: certificate\n  method: POST\n  secretArgs: {common_name: api.example.test, ttl: 1h}\n\
- objectName: tls.key\n  secretPath: pki/issue/web\n  secretKey: private_key\n  method: POST\n  secretArgs: {common_name: api.example.test, ttl: 1h}\n\
- objectName: ca.crt\n  secretPath: pki/issue/web\n  secretKey: ca_chain\n  method: POST\n  secretArgs: {common_name: api.example.test, ttl: 1h}\n";

/// A keybroker volume reading `secret/app/db` from OpenBao through auth mount `mount`, in the
/// Secrets Store Vault provider's attribute names (as `deploy/examples/pod-vault.yaml`).
fn vault_volume(name: &str, mount: &str) -> serde_json::Value {
    csi_volume_with(
        name,
        serde_json::json!({
            "provider": "vault",
            "roleName": "app",
            "vaultAddress": format!("https://{BAO_IP}:8200"),
            "vaultAuthMountPath": mount,
            "objects": OBJECTS,
        }),
    )
}

/// OpenBao's auth methods, trusting the cluster: `jwt` (OIDC discovery from the apiserver)
/// for team-a/api, `kubernetes` (TokenReview) for team-k/api; both roles read `secret/app/*`,
/// PostgreSQL credentials of role `app` and certificates of PKI role `web`.
/// Mount `jwt-short` is `jwt` again with a role whose tokens live 20 s (team-a/rotor).
fn configure_bao(bao: &Bao, pg: &Postgres, dir: &Path) {
    let ca = CLUSTER_CA;
    must(&["create", "serviceaccount", "-n", "default", "bao-reviewer"]);
    must(&[
        "create",
        "clusterrolebinding",
        "bao-reviewer",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=default:bao-reviewer",
    ]);
    let reviewer = must(&[
        "create",
        "token",
        "bao-reviewer",
        "-n",
        "default",
        "--duration=2h",
    ]);
    let policy = dir.join("app.hcl");
    std::fs::write(
        &policy,
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n\
         path \"database/creds/app\" { capabilities = [\"read\"] }\n\
         path \"pki/issue/web\" { capabilities = [\"update\"] }\n",
    )
    .unwrap();
    bao.cli(&["policy", "write", "app", policy.to_str().unwrap()]);
    bao.cli(&["kv", "put", "secret/app/db", &format!("password={SECRET}")]);
    bao.enable_database(pg, "1h", "2h");
    bao.enable_pki("2h");

    for (mount, subject, ttl) in [
        ("jwt", "system:serviceaccount:team-a:api", "1h"),
        ("jwt-short", "system:serviceaccount:team-a:rotor", "20s"),
    ] {
        bao.cli(&["auth", "enable", &format!("-path={mount}"), "jwt"]);
        bao.cli(&[
            "write",
            &format!("auth/{mount}/config"),
            &format!("oidc_discovery_url={ISSUER}"),
            &format!("oidc_discovery_ca_pem=@{ca}"),
        ]);
        bao.cli(&[
            "write",
            &format!("auth/{mount}/role/app"),
            "role_type=jwt",
            "user_claim=sub",
            "bound_audiences=vault",
            &format!("bound_subject={subject}"),
            "token_policies=app",
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={ttl}"),
        ]);
    }

    bao.cli(&["auth", "enable", "kubernetes"]);
    bao.cli(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host=https://{BAO_IP}:6443"),
        &format!("kubernetes_ca_cert=@{ca}"),
        &format!("token_reviewer_jwt={}", reviewer.trim()),
    ]);
    bao.cli(&[
        "write",
        "auth/kubernetes/role/app",
        "bound_service_account_names=api",
        "bound_service_account_namespaces=team-k",
        "audience=vault",
        "token_policies=app",
        "token_ttl=1h",
    ]);
}

/// The stand-in's tenant, the app with a federated credential for team-z/api whose issuer is
/// the apiserver, vault `kv1` the app may read, a secret and a certificate in it.
async fn configure_azure(standin: &AzureStandin) {
    standin
        .post("tenants", serde_json::json!({"tenant": TENANT}))
        .await;
    standin
        .post(
            "apps",
            serde_json::json!({"tenant": TENANT, "clientId": APP, "federated": [
                {"issuer": ISSUER, "subject": "system:serviceaccount:team-z:api", "audiences": [WI_AUDIENCE]},
                {"issuer": ISSUER, "subject": "system:serviceaccount:orders:api", "audiences": [WI_AUDIENCE]},
            ]}),
        )
        .await;
    standin
        .post(
            "vaults",
            serde_json::json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read"}}),
        )
        .await;
    standin.secret("kv1", "db-password", KV_SECRET).await;
    standin
        .post(
            "vaults/kv1/certificates/web",
            serde_json::json!({"key": "rsa", "contentType": "application/x-pem-file", "subject": "web.example.test"}),
        )
        .await;
    // What deploy/examples/pod-init-azure.yaml reads.
    standin
        .post(
            "vaults",
            serde_json::json!({"name": "orders-kv", "tenant": TENANT, "access": {APP: "read"}}),
        )
        .await;
    standin
        .secret("orders-kv", "orders-db-password", ORDERS_SECRET)
        .await;
    standin
        .post(
            "vaults/orders-kv/certificates/orders-tls",
            serde_json::json!({"key": "rsa", "contentType": "application/x-pem-file", "subject": "orders.example.test"}),
        )
        .await;
}

/// The chart's values: bindings for every pod of this file, the OpenBao and stand-in CAs
/// mounted into keybroker, a 5-s poll.
fn values(tmp: &Path, bao: &Bao, standin: &AzureStandin) -> String {
    let vault = |mount: &str| {
        format!(
            "{{vault: {{address: \"https://{BAO_IP}:8200\", authMount: {mount}, role: app, caFile: /bao/vault-ca.pem, tlsServerName: localhost}}}}"
        )
    };
    let azure = format!(
        "{{azure: {{tenantID: {TENANT}, clientID: {APP}, authorityHost: \"{}\", keyvaultDNSSuffix: \"vault.localhost:{}\", caFile: /azure/ca.pem, keyvaults: [kv1]}}}}",
        standin.authority(),
        standin.https_port
    );
    let vault_objects = "[\"secret/app/*\", database/creds/app, pki/issue/web]";
    chart_values(&format!(
        "bindings: |\n  bindings:\n\
         \x20   - {{name: team-a-jwt, namespace: team-a, serviceAccounts: [api, other], identity: {jwt}, objects: {vault_objects}}}\n\
         \x20   - {{name: team-a-short, namespace: team-a, serviceAccounts: [rotor], identity: {short}, objects: {vault_objects}}}\n\
         \x20   - {{name: team-k-kubernetes, namespace: team-k, serviceAccounts: [api], identity: {k8s}, objects: {vault_objects}}}\n\
         \x20   - {{name: team-z-workload-identity, namespace: team-z, serviceAccounts: [api, other], identity: {azure}, objects: [\"secret/*\", \"cert/*\"]}}\n\
         extraVolumes:\n\
         \x20 - {{name: bao-ca, hostPath: {{path: {bao_dir}, type: Directory}}}}\n\
         \x20 - {{name: azure-ca, hostPath: {{path: {azure_dir}, type: Directory}}}}\n\
         extraVolumeMounts:\n\
         \x20 - {{name: bao-ca, mountPath: /bao, readOnly: true}}\n\
         \x20 - {{name: azure-ca, mountPath: /azure, readOnly: true}}\n\
         pollInterval: 5s\n\
         auditDir: {audit}\n\
         stateDir: /var/lib/kubelet/keybroker-state\n",
        jwt = vault("jwt"),
        short = vault("jwt-short"),
        k8s = vault("kubernetes"),
        bao_dir = bao.ca.parent().unwrap().display(),
        azure_dir = standin.dir.display(),
        audit = tmp.join("audit").display(),
    ))
}

/// `cat /<volume>/<file>` in pod `ns/name`.
fn read(ns: &str, name: &str, path: &str) -> String {
    let (ok, got) = kubectl(&["exec", "-n", ns, name, "--", "cat", path]);
    assert!(ok, "{ns}/{name} reading {path}: {got}");
    got
}

/// Files under `dir`/`name`, written from pod `ns/name`.
fn copy_out(dir: &Path, ns: &str, name: &str, files: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for f in files {
        std::fs::write(out.join(f), read(ns, name, &format!("/v/{f}"))).unwrap();
    }
    out
}

fn openssl(args: &[&str], file: &Path) -> Vec<u8> {
    common::output_ok(std::process::Command::new("openssl").args(args).arg(file)).stdout
}

/// The certificate `crt` chains to `ca` and matches key `key` (all PEM files).
fn assert_certificate(ca: &Path, crt: &Path, key: &Path) {
    common::output_ok(
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca)
            .arg(crt),
    );
    assert_eq!(
        openssl(&["x509", "-noout", "-pubkey", "-in"], crt),
        openssl(&["pkey", "-pubout", "-in"], key),
        "{}: the certificate and its key",
        crt.display()
    );
}

/// Responses to logins at `path` in OpenBao's audit log.
fn logins(bao: &Bao, path: &str) -> usize {
    std::fs::read_to_string(&bao.audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "response" && e["request"]["path"] == path)
        .count()
}

#[test]
fn pods_log_in_with_the_apiservers_own_tokens() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let _cluster = Cluster::up();
    let pg = Postgres::start_in_netns(tmp.path(), Path::new(NETNS));
    let bao = Bao::start_in_netns(tmp.path(), Path::new(NETNS), BAO_IP);
    // On port 443 of every address of the namespace: node volumes reach it as `localhost`,
    // pods on the pod network as login.microsoftonline.com and orders-kv.vault.azure.net (the
    // cluster's DNS answers every name with the node's address).
    let standin = AzureStandin::start_in_netns(
        tmp.path(),
        Path::new(NETNS),
        &[
            "--issuer-ca",
            CLUSTER_CA,
            "--bind",
            "0.0.0.0",
            "--https-port",
            "443",
        ],
    );
    allow_anonymous_oidc_discovery();
    configure_bao(&bao, &pg, tmp.path());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(configure_azure(&standin));
    let values_file = tmp.path().join("values.yaml");
    std::fs::write(&values_file, values(tmp.path(), &bao, &standin)).unwrap();
    helm("install", &values_file, &[]);
    one_ready_node_pod("the DaemonSet Ready", |_, _| true);
    for ns in ["team-a", "team-k", "team-z"] {
        must(&["create", "namespace", ns]);
    }
    for (ns, sa) in [
        ("team-a", "api"),
        ("team-a", "other"),
        ("team-a", "rotor"),
        ("team-k", "api"),
        ("team-z", "api"),
        ("team-z", "other"),
    ] {
        must(&["create", "serviceaccount", "-n", ns, sa]);
    }

    init_example(&standin, tmp.path());
    vault_pods(&bao, &pg, tmp.path());
    vault_token_expiry_across_rotations(&bao);
    azure_pods(&standin, tmp.path());
    configure_bao_for_the_sidecar_example(&bao);
    sidecar_example(&bao, &pg);

    for (ns, name) in [
        ("team-a", "jwt-reader"),
        ("team-k", "k8s-reader"),
        ("team-a", "stranger"),
        ("team-a", "rotor"),
        ("team-z", "wi-reader"),
        ("team-z", "wi-stranger"),
        ("payments", "web"),
        ("orders", "orders"),
    ] {
        must(&["delete", "pod", "-n", ns, name, "--wait=true"]);
    }
    uninstall();
    assert!(keybroker_mounts().is_empty(), "{:?}", keybroker_mounts());
}

/// A pod of each Vault auth method reads KV, a database credential and a certificate; a pod
/// Vault's role does not name is refused.
fn vault_pods(bao: &Bao, pg: &Postgres, tmp: &Path) {
    let jwt = [vault_volume("v", "jwt")];
    let k8s = [vault_volume("v", "kubernetes")];
    apply(&pod("jwt-reader", "team-a", "api", "sleep 3600", &jwt));
    apply(&pod("k8s-reader", "team-k", "api", "sleep 3600", &k8s));
    apply(&pod("stranger", "team-a", "other", "sleep 3600", &jwt));
    for (ns, name) in [("team-a", "jwt-reader"), ("team-k", "k8s-reader")] {
        let took = eventually(&format!("{name} Running"), || phase(ns, name) == "Running");
        assert_eq!(read(ns, name, "/v/password"), SECRET, "{name}");
        // The database credential Vault made for this pod logs in.
        let (user, password) = (
            read(ns, name, "/v/db-user"),
            read(ns, name, "/v/db-password"),
        );
        let who = pg
            .login(&user, &password)
            .unwrap_or_else(|e| panic!("{name}'s database credential: {e}"));
        assert_eq!(who, user);
        // The certificate chains to the CA file beside it and matches the key.
        let pem = copy_out(tmp, ns, name, &["tls.crt", "tls.key", "ca.crt"]);
        assert_certificate(
            &pem.join("ca.crt"),
            &pem.join("tls.crt"),
            &pem.join("tls.key"),
        );
        println!(
            "{name}: read its KV secret, database credential (logs in as {user}) and certificate; Running {:.1} s after creation",
            took.as_secs_f64()
        );
    }
    // Vault's role refuses team-a/other: the event says so (a denial, no token or secret).
    eventually("the stranger's FailedMount event", || {
        events("team-a", "stranger", "FailedMount").contains("PermissionDenied")
    });
    let msg = events("team-a", "stranger", "FailedMount");
    println!("stranger's FailedMount: {msg}");
    assert!(!msg.contains(SECRET) && !msg.contains("eyJ"), "{msg}");
    assert_eq!(phase("team-a", "stranger"), "Pending");
    // Both logins reached OpenBao with the apiserver's tokens.
    for path in ["auth/jwt/login", "auth/kubernetes/login"] {
        assert!(logins(bao, path) > 0, "no {path} in OpenBao's audit log");
    }
}

/// team-a/rotor logs in through `jwt-short`, whose tokens live 20 s: the pod sees its secret
/// rotate once, then again after its Vault token has expired (keybroker logged in again with
/// the pod's service-account token from kubelet's last publish).
fn vault_token_expiry_across_rotations(bao: &Bao) {
    bao.cli(&["kv", "put", "secret/app/rotating", "value=v1-Rot-0001"]);
    let objects = "- objectName: value\n  secretPath: secret/app/rotating\n  secretKey: value\n";
    let volume = csi_volume_with(
        "v",
        serde_json::json!({
            "provider": "vault",
            "roleName": "app",
            "vaultAddress": format!("https://{BAO_IP}:8200"),
            "vaultAuthMountPath": "jwt-short",
            "objects": objects,
        }),
    );
    apply(&pod("rotor", "team-a", "rotor", "sleep 3600", &[volume]));
    eventually("rotor Running", || phase("team-a", "rotor") == "Running");
    assert_eq!(read("team-a", "rotor", "/v/value"), "v1-Rot-0001");
    bao.cli(&["kv", "put", "secret/app/rotating", "value=v2-Rot-0002"]);
    let took = eventually("the first rotation in the pod", || {
        read("team-a", "rotor", "/v/value") == "v2-Rot-0002"
    });
    println!(
        "rotor: v2 in the pod {:.1} s after the write",
        took.as_secs_f64()
    );
    // The Vault token of the first login has expired once a second login has happened
    // after 20 s; keybroker makes it only when the first token can no longer be used.
    let first = logins(bao, "auth/jwt-short/login");
    assert!(first >= 1, "no login through jwt-short");
    let started = std::time::Instant::now();
    eventually("a login after the Vault token's expiry", || {
        started.elapsed() > std::time::Duration::from_secs(21)
            && logins(bao, "auth/jwt-short/login") > first
    });
    bao.cli(&["kv", "put", "secret/app/rotating", "value=v3-Rot-0003"]);
    let took = eventually("the rotation after the token's expiry", || {
        read("team-a", "rotor", "/v/value") == "v3-Rot-0003"
    });
    println!(
        "rotor: v3 in the pod {:.1} s after the write, {} logins through jwt-short in all",
        took.as_secs_f64(),
        logins(bao, "auth/jwt-short/login")
    );
    // kubelet restarted (its token cache is in memory): its next publish of the volume carries
    // a new token, and keybroker's next login (the Vault token still lives 20 s) presents it.
    let before = login_jwts(bao, "auth/jwt-short/login");
    let out = script(&["restart-kubelet"]);
    assert!(
        out.status.success(),
        "restart-kubelet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = eventually("a login with kubelet's new token", || {
        login_jwts(bao, "auth/jwt-short/login")
            .iter()
            .any(|j| !before.contains(j))
    });
    println!(
        "rotor: a login with the token kubelet requested after its restart {:.1} s later ({} distinct tokens before)",
        took.as_secs_f64(),
        before.len()
    );
    bao.cli(&["kv", "put", "secret/app/rotating", "value=v4-Rot-0004"]);
    eventually("the rotation after kubelet's new token", || {
        read("team-a", "rotor", "/v/value") == "v4-Rot-0004"
    });
    let events = events("team-a", "rotor", "FailedMount");
    assert!(events.is_empty(), "rotor: {events}");
}

/// The service-account tokens presented at logins through `path`, as OpenBao's audit log
/// keeps them (HMACs: equal tokens, equal strings), distinct, in order.
fn login_jwts(bao: &Bao, path: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for e in std::fs::read_to_string(&bao.audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "request" && e["request"]["path"] == path)
    {
        let jwt = e["request"]["data"]["jwt"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            jwt.starts_with("hmac-sha256:"),
            "OpenBao's audit log keeps {jwt:?}"
        );
        if !seen.contains(&jwt) {
            seen.push(jwt);
        }
    }
    seen
}

/// A pod shaped the way the Azure workload identity webhook leaves it: the pod label, the
/// service account's client-id annotation, the `AZURE_*` environment and the projected
/// token (audience api://AzureADTokenExchange) at the webhook's path.
fn workload_identity_pod(name: &str, sa: &str, volume: &serde_json::Value) -> String {
    let mut p: serde_json::Value = serde_json::from_str(&pod(
        name,
        "team-z",
        sa,
        "sleep 3600",
        std::slice::from_ref(volume),
    ))
    .unwrap();
    p["metadata"]["labels"] = serde_json::json!({"azure.workload.identity/use": "true"});
    let c = &mut p["spec"]["containers"][0];
    c["env"] = serde_json::json!([
        {"name": "AZURE_CLIENT_ID", "value": APP},
        {"name": "AZURE_TENANT_ID", "value": TENANT},
        {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": "/var/run/secrets/azure/tokens/azure-identity-token"},
        {"name": "AZURE_AUTHORITY_HOST", "value": "https://login.microsoftonline.com/"},
    ]);
    c["volumeMounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "azure-identity-token", "mountPath": "/var/run/secrets/azure/tokens", "readOnly": true}));
    p["spec"]["volumes"].as_array_mut().unwrap().push(serde_json::json!({
        "name": "azure-identity-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "path": "azure-identity-token", "audience": WI_AUDIENCE, "expirationSeconds": 3600}}]}
    }));
    p.to_string()
}

/// team-z/api reads a Key Vault secret and a certificate through a node volume, with its
/// token from the apiserver checked by the stand-in against the apiserver's JWKS; team-z/other
/// is refused by Entra (AADSTS70021).
fn azure_pods(standin: &AzureStandin, tmp: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for sa in ["api", "other"] {
        must(&[
            "annotate",
            "serviceaccount",
            "-n",
            "team-z",
            sa,
            &format!("azure.workload.identity/client-id={APP}"),
            &format!("azure.workload.identity/tenant-id={TENANT}"),
        ]);
    }
    let volume = csi_volume_with(
        "v",
        serde_json::json!({
            "keyvaultName": "kv1",
            "clientID": APP,
            "tenantID": TENANT,
            "objects": "array:\n  - |\n    objectName: db-password\n    objectType: secret\n  - |\n    objectName: web\n    objectAlias: tls.crt\n    objectType: cert\n  - |\n    objectName: web\n    objectAlias: web.pem\n    objectType: secret\n",
        }),
    );
    apply(&workload_identity_pod("wi-reader", "api", &volume));
    apply(&workload_identity_pod("wi-stranger", "other", &volume));
    let took = eventually("wi-reader Running", || {
        phase("team-z", "wi-reader") == "Running"
    });
    assert_eq!(read("team-z", "wi-reader", "/v/db-password"), KV_SECRET);
    // The certificate chains to the stand-in's issuing CA and matches the key in the secret.
    let pem = copy_out(tmp, "team-z", "wi-reader", &["tls.crt", "web.pem"]);
    let issuer =
        rt.block_on(standin.admin(reqwest::Method::GET, "issuer-ca", serde_json::Value::Null));
    std::fs::write(pem.join("issuer.pem"), issuer["pem"].as_str().unwrap()).unwrap();
    assert_certificate(
        &pem.join("issuer.pem"),
        &pem.join("tls.crt"),
        &pem.join("web.pem"),
    );
    // The token the stand-in accepted is the apiserver's, for this pod's service account.
    let tokens = rt.block_on(standin.requests_of("entra"));
    assert!(
        tokens
            .iter()
            .any(|r| r["subject"] == "system:serviceaccount:team-z:api"),
        "no token exchange for team-z/api: {tokens:?}"
    );
    // The pod's own projected token is the apiserver's too (what an SDK in the pod would use).
    let token = read(
        "team-z",
        "wi-reader",
        "/var/run/secrets/azure/tokens/azure-identity-token",
    );
    let claims = jwt_claims(&token);
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"][0], WI_AUDIENCE);
    println!(
        "wi-reader: read its Key Vault secret and certificate; Running {:.1} s after creation",
        took.as_secs_f64()
    );
    eventually("wi-stranger's FailedMount event", || {
        events("team-z", "wi-stranger", "FailedMount").contains("AADSTS70021")
    });
    let msg = events("team-z", "wi-stranger", "FailedMount");
    println!("wi-stranger's FailedMount: {msg}");
    assert!(msg.contains("PermissionDenied"), "{msg}");
    assert!(!msg.contains(KV_SECRET) && !msg.contains("eyJ"), "{msg}");
    assert_eq!(phase("team-z", "wi-stranger"), "Pending");
}

/// The claims of a JWT (not verified: the test only looks at who issued it).
fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let body = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body.trim_end_matches('='))
            .unwrap(),
    )
    .unwrap()
}

/// What deploy/examples/pod-sidecar-vault.yaml reads, under the names it uses: jwt role
/// `payments-web` for payments/web, `secret/payments/db`, database role `payments-web`.
fn configure_bao_for_the_sidecar_example(bao: &Bao) {
    let policy = std::env::temp_dir().join(format!("kb-payments-{}.hcl", std::process::id()));
    std::fs::write(
        &policy,
        "path \"secret/data/payments/*\" { capabilities = [\"read\"] }\n\
         path \"database/creds/payments-web\" { capabilities = [\"read\"] }\n",
    )
    .unwrap();
    bao.cli(&["policy", "write", "payments", policy.to_str().unwrap()]);
    let _ = std::fs::remove_file(&policy);
    bao.cli(&[
        "kv",
        "put",
        "secret/payments/db",
        &format!("password={PAYMENTS_V1}"),
    ]);
    bao.cli(&[
        "write",
        "database/roles/payments-web",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "default_ttl=1h",
        "max_ttl=2h",
    ]);
    bao.cli(&[
        "write",
        "auth/jwt/role/payments-web",
        "role_type=jwt",
        "user_claim=sub",
        "bound_audiences=vault",
        "bound_subject=system:serviceaccount:payments:web",
        "token_policies=payments",
        "token_ttl=1h",
    ]);
}

/// The documents of `deploy/examples/<file>`.
fn example(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo().join("deploy/examples").join(file)).unwrap();
    text.split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// `text` with its only occurrence of `from` replaced.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} in {text}");
    text.replacen(from, to, 1)
}

/// A namespace where Pod Security admission enforces `restricted`; a host-network pod is
/// refused there (so admission is on, and the examples' pods pass it on their merits).
fn restricted_namespace(ns: &str) {
    must(&["create", "namespace", ns]);
    must(&[
        "label",
        "namespace",
        ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    let mut probe: serde_json::Value =
        serde_json::from_str(&pod("host-network", ns, "default", "sleep 1", &[])).unwrap();
    probe["spec"]["hostNetwork"] = serde_json::json!(true);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), probe.to_string()).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", f.path().to_str().unwrap()]);
    assert!(!ok && out.contains("violates PodSecurity"), "{ns}: {out}");
}

/// How many times the app of payments/web has logged a reload (its SIGHUP trap).
fn reloads() -> usize {
    kubectl(&["logs", "-n", "payments", "web", "-c", "app"])
        .1
        .matches("reloading: secrets changed")
        .count()
}

/// deploy/examples/pod-sidecar-vault.yaml as it is, in a `restricted` namespace. Its ConfigMap
/// gets this cluster's environment only: OpenBao's CA (the example's placeholder), the name on
/// OpenBao's dev certificate (`localhost`) and a 5-s poll instead of 2 m. The sidecar logs in
/// with the pod's projected token through jwt auth; the app starts after the first complete
/// write, reads the files from the shared emptyDir, and gets one SIGHUP per rotation.
fn sidecar_example(bao: &Bao, pg: &Postgres) {
    restricted_namespace("payments");
    must(&["create", "serviceaccount", "-n", "payments", "web"]);
    let mut docs = example("pod-sidecar-vault.yaml");
    let cm = docs.iter_mut().find(|d| d["kind"] == "ConfigMap").unwrap();
    let config = cm["data"]["config.yaml"].as_str().unwrap();
    let config = replace_once(
        config,
        "caFile: /etc/keybroker/vault-ca.pem}",
        "caFile: /etc/keybroker/vault-ca.pem, tlsServerName: localhost}",
    );
    let config = replace_once(&config, "pollInterval: 2m", "pollInterval: 5s");
    cm["data"]["config.yaml"] = config.into();
    cm["data"]["vault-ca.pem"] = std::fs::read_to_string(&bao.ca).unwrap().into();
    for d in docs.iter().rev() {
        apply(&d.to_string());
    }
    let took = eventually("payments/web Ready", || {
        get(
            "payments",
            "pod",
            "web",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True"
    });
    let app_log = kubectl(&["logs", "-n", "payments", "web", "-c", "app"]).1;
    assert!(app_log.contains("secrets present at start"), "{app_log}");
    let file = |f: &str| read_in("payments", "web", "app", &format!("/run/secrets/app/{f}"));
    assert_eq!(file("db-password"), PAYMENTS_V1);
    // postgresql://USER:PASSWORD@postgres:5432/payments, a credential that logs in.
    let url = file("database-url");
    let creds = url
        .strip_prefix("postgresql://")
        .and_then(|r| r.split_once('@'))
        .map(|(c, _)| c.to_owned())
        .unwrap_or_else(|| panic!("database-url is not the template's shape"));
    let (user, password) = creds.split_once(':').unwrap();
    assert_eq!(
        pg.login(user, password).expect("the sidecar's credential"),
        user
    );
    println!(
        "payments/web: Ready {:.1} s after creation under PSA restricted; the app started with its files",
        took.as_secs_f64()
    );
    for (n, value) in [(1, PAYMENTS_V2), (2, PAYMENTS_V3)] {
        bao.cli(&[
            "kv",
            "put",
            "secret/payments/db",
            &format!("password={value}"),
        ]);
        let took = eventually("the rotation in the app's files", || {
            file("db-password") == value
        });
        eventually("the app's reload", || reloads() >= n);
        // Three more polls: a second signal for the same rotation would have come by then.
        std::thread::sleep(std::time::Duration::from_secs(15));
        assert_eq!(reloads(), n, "SIGHUPs after rotation {n}");
        println!(
            "payments/web: rotation {n} in the app's files {:.1} s after the write, one SIGHUP",
            took.as_secs_f64()
        );
    }
}

/// `cat PATH` in container `c` of pod `ns/name`.
fn read_in(ns: &str, name: &str, c: &str, path: &str) -> String {
    let (ok, got) = kubectl(&["exec", "-n", ns, name, "-c", c, "--", "cat", path]);
    assert!(ok, "{ns}/{name}/{c} reading {path}: {got}");
    got
}

/// What the Azure workload identity webhook does to a pod with its label whose service account
/// carries the client-id annotation: the `AZURE_*` environment in every container and the
/// projected token (audience api://AzureADTokenExchange) mounted at the webhook's path.
fn as_the_webhook_mutates(pod: &mut serde_json::Value) {
    let env = serde_json::json!([
        {"name": "AZURE_CLIENT_ID", "value": APP},
        {"name": "AZURE_TENANT_ID", "value": TENANT},
        {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": "/var/run/secrets/azure/tokens/azure-identity-token"},
        {"name": "AZURE_AUTHORITY_HOST", "value": "https://login.microsoftonline.com/"},
    ]);
    for kind in ["initContainers", "containers"] {
        for c in pod["spec"][kind].as_array_mut().into_iter().flatten() {
            let e = c["env"].as_array().cloned().unwrap_or_default();
            c["env"] = e
                .into_iter()
                .chain(env.as_array().unwrap().clone())
                .collect();
            let mut m = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            m.push(serde_json::json!({"name": "azure-identity-token", "mountPath": "/var/run/secrets/azure/tokens", "readOnly": true}));
            c["volumeMounts"] = m.into();
        }
    }
    pod["spec"]["volumes"].as_array_mut().unwrap().push(serde_json::json!({
        "name": "azure-identity-token",
        "projected": {"sources": [{"serviceAccountToken": {
            "path": "azure-identity-token", "audience": WI_AUDIENCE, "expirationSeconds": 3600}}]}
    }));
}

/// deploy/examples/pod-init-azure.yaml as it is, in a `restricted` namespace, mutated as the
/// workload identity webhook would; its ConfigMap gets the stand-in's CA (Key Vault and Entra
/// there are the stand-in, on the names of the public cloud). `keybroker init` exchanges the
/// pod's projected token at "Entra" and writes the files the app then reads.
fn init_example(standin: &AzureStandin, tmp: &Path) {
    restricted_namespace("orders");
    must(&["create", "serviceaccount", "-n", "orders", "api"]);
    must(&[
        "annotate",
        "serviceaccount",
        "-n",
        "orders",
        "api",
        &format!("azure.workload.identity/client-id={APP}"),
    ]);
    let mut docs = example("pod-init-azure.yaml");
    for d in docs.iter_mut() {
        if d["kind"] == "ConfigMap" {
            let config = replace_once(
                d["data"]["config.yaml"].as_str().unwrap(),
                "azure: {keyvaultName: orders-kv}",
                "azure: {keyvaultName: orders-kv, caFile: /etc/keybroker/azure-ca.pem}",
            );
            d["data"]["config.yaml"] = config.into();
            d["data"]["azure-ca.pem"] = std::fs::read_to_string(standin.ca()).unwrap().into();
        } else {
            as_the_webhook_mutates(d);
        }
    }
    for d in docs.iter().rev() {
        apply(&d.to_string());
    }
    let took = eventually("orders/orders Running", || {
        let restarts = get(
            "orders",
            "pod",
            "orders",
            "{.status.initContainerStatuses[0].restartCount}",
        );
        if restarts.parse::<u32>().unwrap_or(0) > 0 {
            let rt = tokio::runtime::Runtime::new().unwrap();
            panic!(
                "keybroker init failed in orders/orders:\n{}\nthe stand-in's requests: {:#?}",
                kubectl(&[
                    "logs",
                    "-n",
                    "orders",
                    "orders",
                    "-c",
                    "keybroker",
                    "--previous"
                ])
                .1,
                rt.block_on(standin.requests())
            );
        }
        phase("orders", "orders") == "Running"
    });
    assert_eq!(
        read_in("orders", "orders", "app", "/run/secrets/app/db-password"),
        ORDERS_SECRET
    );
    let crt = tmp.join("orders-tls.crt");
    std::fs::write(
        &crt,
        read_in("orders", "orders", "app", "/run/secrets/app/tls.crt"),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let issuer =
        rt.block_on(standin.admin(reqwest::Method::GET, "issuer-ca", serde_json::Value::Null));
    let ca = tmp.join("orders-issuer.pem");
    std::fs::write(&ca, issuer["pem"].as_str().unwrap()).unwrap();
    common::output_ok(
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca)
            .arg(&crt),
    );
    println!(
        "orders/orders: keybroker init wrote its files under PSA restricted; Running {:.1} s after creation",
        took.as_secs_f64()
    );
}
