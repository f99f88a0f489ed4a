//! Real identities in the real cluster (issue #23, part 1): OpenBao runs inside the test
//! cluster's network namespace and trusts the cluster's own service-account tokens, set up the
//! way Vault's documentation tells operators to:
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
//! reaches the pod's `FailedMount` event as a denial.

mod common;

use std::path::Path;

use common::cluster::*;
use common::peers::{Bao, Postgres};

const SECRET: &str = "S3cret-from-bao-7781";
/// Where OpenBao listens: the node's address inside the cluster's network namespace.
const BAO_IP: &str = "10.213.0.1";
const NETNS: &str = "/run/netns/kb-cluster";
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
fn configure_bao(bao: &Bao, pg: &Postgres, dir: &Path) {
    let ca = "/run/keybroker-cluster/pki/ca.crt";
    // Anonymous OIDC discovery, as the Kubernetes documentation describes for external
    // verifiers of service-account tokens.
    must(&[
        "create",
        "clusterrolebinding",
        "oidc-discovery-anonymous",
        "--clusterrole=system:service-account-issuer-discovery",
        "--group=system:unauthenticated",
    ]);
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

    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!("oidc_discovery_url=https://{BAO_IP}:6443"),
        &format!("oidc_discovery_ca_pem=@{ca}"),
    ]);
    bao.cli(&[
        "write",
        "auth/jwt/role/app",
        "role_type=jwt",
        "user_claim=sub",
        "bound_audiences=vault",
        "bound_subject=system:serviceaccount:team-a:api",
        "token_policies=app",
        "token_ttl=1h",
    ]);

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

#[test]
fn pods_log_in_to_openbao_with_the_apiservers_own_tokens() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let _cluster = Cluster::up();
    let pg = Postgres::start_in_netns(tmp.path(), Path::new(NETNS));
    let bao = Bao::start_in_netns(tmp.path(), Path::new(NETNS), BAO_IP);
    configure_bao(&bao, &pg, tmp.path());

    // Bindings: team-a/api through `jwt`, team-k/api through `kubernetes`, and team-a/other
    // bound to the `jwt` role too (keybroker lets it ask; Vault's role does not name it).
    let vault = |mount: &str| {
        format!(
            "{{vault: {{address: \"https://{BAO_IP}:8200\", authMount: {mount}, role: app, caFile: /bao/vault-ca.pem, tlsServerName: localhost}}}}"
        )
    };
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        chart_values(&format!(
            "bindings: |\n  bindings:\n\
             \x20   - {{name: team-a-jwt, namespace: team-a, serviceAccounts: [api, other], identity: {jwt}, objects: [\"secret/app/*\", database/creds/app, pki/issue/web]}}\n\
             \x20   - {{name: team-k-kubernetes, namespace: team-k, serviceAccounts: [api], identity: {k8s}, objects: [\"secret/app/*\", database/creds/app, pki/issue/web]}}\n\
             extraVolumes:\n  - {{name: bao-ca, hostPath: {{path: {ca_dir}, type: Directory}}}}\n\
             extraVolumeMounts:\n  - {{name: bao-ca, mountPath: /bao, readOnly: true}}\n\
             auditDir: {audit}\n\
             stateDir: /var/lib/kubelet/keybroker-state\n",
            jwt = vault("jwt"),
            k8s = vault("kubernetes"),
            ca_dir = bao.ca.parent().unwrap().display(),
            audit = tmp.path().join("audit").display(),
        )),
    )
    .unwrap();
    helm("install", &values, &[]);
    one_ready_node_pod("the DaemonSet Ready", |_, _| true);
    for ns in ["team-a", "team-k"] {
        must(&["create", "namespace", ns]);
    }
    for (ns, sa) in [("team-a", "api"), ("team-a", "other"), ("team-k", "api")] {
        must(&["create", "serviceaccount", "-n", ns, sa]);
    }
    let jwt = [vault_volume("v", "jwt")];
    let k8s = [vault_volume("v", "kubernetes")];
    apply(&pod("jwt-reader", "team-a", "api", "sleep 3600", &jwt));
    apply(&pod("k8s-reader", "team-k", "api", "sleep 3600", &k8s));
    apply(&pod("stranger", "team-a", "other", "sleep 3600", &jwt));
    for (ns, name) in [("team-a", "jwt-reader"), ("team-k", "k8s-reader")] {
        let took = eventually(&format!("{name} Running"), || phase(ns, name) == "Running");
        let file = |f: &str| {
            let (ok, got) = kubectl(&["exec", "-n", ns, name, "--", "cat", &format!("/v/{f}")]);
            assert!(ok, "{name} reading {f}: {got}");
            got
        };
        assert_eq!(file("password"), SECRET, "{name}");
        // The database credential Vault made for this pod logs in.
        let (user, password) = (file("db-user"), file("db-password"));
        let who = pg
            .login(&user, &password)
            .unwrap_or_else(|e| panic!("{name}'s database credential: {e}"));
        assert_eq!(who, user);
        // The certificate chains to the CA file beside it and matches the key.
        let pem = tmp.path().join(name);
        std::fs::create_dir_all(&pem).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::write(pem.join(f), file(f)).unwrap();
        }
        common::output_ok(
            std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(pem.join("ca.crt"))
                .arg(pem.join("tls.crt")),
        );
        let public = |args: &[&str], f: &str| {
            common::output_ok(
                std::process::Command::new("openssl")
                    .args(args)
                    .arg(pem.join(f)),
            )
            .stdout
        };
        assert_eq!(
            public(&["x509", "-noout", "-pubkey", "-in"], "tls.crt"),
            public(&["pkey", "-pubout", "-in"], "tls.key"),
            "{name}: the certificate and its key"
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
    let logins = std::fs::read_to_string(&bao.audit_log).unwrap_or_default();
    for path in ["auth/jwt/login", "auth/kubernetes/login"] {
        assert!(logins.contains(path), "no {path} in OpenBao's audit log");
    }
    for (ns, name) in [
        ("team-a", "jwt-reader"),
        ("team-k", "k8s-reader"),
        ("team-a", "stranger"),
    ] {
        must(&["delete", "pod", "-n", ns, name, "--wait=true"]);
    }
    uninstall();
    assert!(keybroker_mounts().is_empty(), "{:?}", keybroker_mounts());
}
