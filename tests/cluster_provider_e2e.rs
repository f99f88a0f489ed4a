//! keybroker's provider mode behind the real Secrets Store CSI driver (issue #23, part 4): the
//! driver v1.6.0 built from its module runs as its own DaemonSet (its CRDs, RBAC, CSIDriver
//! and DaemonSet from its `deploy/`; see `install_secrets_store_driver`), keybroker is
//! installed with the chart's `mode=provider`, and pods mount `secretProviderClass` volumes in
//! the Vault and Azure providers' documented parameter formats. The pods' tokens are the
//! apiserver's own (the driver's CSIDriver `tokenRequests`), checked by OpenBao's jwt auth and by
//! the Entra stand-in against the apiserver's JWKS. The driver's rotation brings a new value
//! into a running pod; a pod no binding selects gets keybroker's `PermissionDenied` in its event.
//! The Secrets Store Azure provider v1.7.2 itself runs beside keybroker behind the same driver
//! (its own DaemonSet, from its `deployment/`) and reads from the same stand-in.

mod common;

use std::path::Path;

use common::azure::{APP, AzureStandin, TENANT};
use common::cluster::*;
use common::peers::Bao;

const BAO_IP: &str = NODE_IP;
const WI_AUDIENCE: &str = "api://AzureADTokenExchange";
const V1: &str = "S3cret-provider-v1-2231";
const V2: &str = "S3cret-provider-v2-2232";
const KV_SECRET: &str = "S3cret-provider-kv-2233";

/// OpenBao: KV `secret/app/db`, jwt auth trusting the apiserver (role `app` for team-a/api).
fn configure_bao(bao: &Bao, dir: &Path) {
    let policy = dir.join("app.hcl");
    std::fs::write(
        &policy,
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n",
    )
    .unwrap();
    bao.cli(&["policy", "write", "app", policy.to_str().unwrap()]);
    bao.cli(&["kv", "put", "secret/app/db", &format!("password={V1}")]);
    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!("oidc_discovery_url={ISSUER}"),
        &format!("oidc_discovery_ca_pem=@{CLUSTER_CA}"),
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
}

/// The stand-in: team-z/api's app (federated credential on the apiserver's issuer), vault kv1.
async fn configure_azure(standin: &AzureStandin) {
    standin
        .post("tenants", serde_json::json!({"tenant": TENANT}))
        .await;
    standin
        .post(
            "apps",
            serde_json::json!({"tenant": TENANT, "clientId": APP, "federated": [{
                "issuer": ISSUER,
                "subject": "system:serviceaccount:team-z:api",
                "audiences": [WI_AUDIENCE],
            }]}),
        )
        .await;
    standin
        .post(
            "vaults",
            serde_json::json!({"name": "kv1", "tenant": TENANT, "access": {APP: "read"}}),
        )
        .await;
    standin.secret("kv1", "db-password", KV_SECRET).await;
}

/// A SecretProviderClass for keybroker in namespace `ns` with `parameters` (YAML lines).
fn class(name: &str, ns: &str, parameters: &str) -> String {
    format!(
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  provider: keybroker\n  parameters:\n{parameters}"
    )
}

/// A volume of the Secrets Store driver with SecretProviderClass `class`.
fn driver_volume(class: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "v",
        "csi": {
            "driver": "secrets-store.csi.k8s.io",
            "readOnly": true,
            "volumeAttributes": {"secretProviderClass": class},
        }
    })
}

fn read(ns: &str, name: &str, path: &str) -> String {
    let (ok, got) = kubectl(&["exec", "-n", ns, name, "--", "cat", path]);
    assert!(ok, "{ns}/{name} reading {path}: {got}");
    got
}

#[test]
fn the_real_secrets_store_driver_mounts_through_keybroker() {
    common::require_root_and_fuse();
    let tmp = common::open_tempdir();
    let _cluster = Cluster::up();
    let bao = Bao::start_in_netns(tmp.path(), Path::new(NETNS), BAO_IP);
    // On port 443 of the namespace: keybroker reaches it as `localhost`, the Azure provider as
    // login.microsoftonline.com and kv1.vault.azure.net (the cluster's DNS answers every name
    // with the node's address).
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
    configure_bao(&bao, tmp.path());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(configure_azure(&standin));

    install_secrets_store_driver(&["vault", WI_AUDIENCE], "10s");
    install_azure_provider(&standin.dir);
    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        chart_values(&format!(
            "mode: provider\n\
             metricsPort: 9810\n\
             pollInterval: 5s\n\
             bindings: |\n  bindings:\n\
             \x20   - {{name: team-a-vault, namespace: team-a, serviceAccounts: [api], identity: {{vault: {{address: \"https://{BAO_IP}:8200\", authMount: jwt, role: app, caFile: /bao/vault-ca.pem, tlsServerName: localhost}}}}, objects: [\"secret/data/app/*\"]}}\n\
             \x20   - {{name: team-z-azure, namespace: team-z, serviceAccounts: [api], identity: {{azure: {{tenantID: {TENANT}, clientID: {APP}, authorityHost: \"{authority}\", keyvaultDNSSuffix: \"vault.localhost:{port}\", caFile: /azure/ca.pem, keyvaults: [kv1]}}}}, objects: [\"secret/*\"]}}\n\
             extraVolumes:\n\
             \x20 - {{name: bao-ca, hostPath: {{path: {bao_dir}, type: Directory}}}}\n\
             \x20 - {{name: azure-ca, hostPath: {{path: {azure_dir}, type: Directory}}}}\n\
             extraVolumeMounts:\n\
             \x20 - {{name: bao-ca, mountPath: /bao, readOnly: true}}\n\
             \x20 - {{name: azure-ca, mountPath: /azure, readOnly: true}}\n\
             auditDir: {audit}\n",
            authority = standin.authority(),
            port = standin.https_port,
            bao_dir = bao.ca.parent().unwrap().display(),
            azure_dir = standin.dir.display(),
            audit = tmp.path().join("audit").display(),
        )),
    )
    .unwrap();
    helm("install", &values, &[]);
    eventually("the keybroker provider pod Ready", || {
        kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/name=keybroker-provider",
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].ready}",
        ])
        .1 == "true"
    });

    for ns in ["team-a", "team-z"] {
        must(&["create", "namespace", ns]);
    }
    for (ns, sa) in [("team-a", "api"), ("team-a", "stranger"), ("team-z", "api")] {
        must(&["create", "serviceaccount", "-n", ns, sa]);
    }
    // The Vault CSI provider's parameters and the Azure provider's, as their docs write them;
    // only `provider:` names keybroker.
    apply(&class(
        "app-vault",
        "team-a",
        &format!(
            "    roleName: app\n    vaultAddress: https://{BAO_IP}:8200\n    vaultAuthMountPath: jwt\n\
             \x20   objects: |\n      - objectName: password\n        secretPath: secret/data/app/db\n        secretKey: password\n"
        ),
    ));
    apply(&class(
        "app-azure",
        "team-z",
        &format!(
            "    usePodIdentity: \"false\"\n    clientID: {APP}\n    keyvaultName: kv1\n    tenantId: {TENANT}\n\
             \x20   objects: |\n      array:\n        - |\n          objectName: db-password\n          objectType: secret\n"
        ),
    ));
    // The same class for the Azure provider itself, behind the same driver.
    let azure_params = format!(
        "    usePodIdentity: \"false\"\n    clientID: {APP}\n    keyvaultName: kv1\n    tenantId: {TENANT}\n\
         \x20   objects: |\n      array:\n        - |\n          objectName: db-password\n          objectType: secret\n"
    );
    apply(
        &class("app-azure-upstream", "team-z", &azure_params)
            .replace("provider: keybroker", "provider: azure"),
    );
    apply(&pod(
        "azure-upstream",
        "team-z",
        "api",
        "sleep 3600",
        &[driver_volume("app-azure-upstream")],
    ));
    apply(&pod(
        "vault-app",
        "team-a",
        "api",
        "sleep 3600",
        &[driver_volume("app-vault")],
    ));
    apply(&pod(
        "azure-app",
        "team-z",
        "api",
        "sleep 3600",
        &[driver_volume("app-azure")],
    ));
    apply(&pod(
        "stranger",
        "team-a",
        "stranger",
        "sleep 3600",
        &[driver_volume("app-vault")],
    ));

    let took = eventually("vault-app Running", || {
        phase("team-a", "vault-app") == "Running"
    });
    assert_eq!(read("team-a", "vault-app", "/v/password"), V1);
    println!(
        "vault-app: Running {:.1} s after creation, its file read",
        took.as_secs_f64()
    );
    let took = eventually("azure-app Running", || {
        phase("team-z", "azure-app") == "Running"
    });
    assert_eq!(read("team-z", "azure-app", "/v/db-password"), KV_SECRET);
    println!(
        "azure-app: Running {:.1} s after creation, its file read",
        took.as_secs_f64()
    );

    // The driver's rotation (kubelet republishes, the driver calls Mount, keybroker answers
    // with what its 5-s poll found) brings the new value into the running pod.
    let took = eventually("azure-upstream Running", || {
        phase("team-z", "azure-upstream") == "Running"
    });
    assert_eq!(
        read("team-z", "azure-upstream", "/v/db-password"),
        KV_SECRET
    );
    println!(
        "azure-upstream (the Azure provider {AZURE_PROVIDER} beside keybroker, same driver and stand-in): Running {:.1} s after creation, its file read",
        took.as_secs_f64()
    );

    bao.cli(&["kv", "put", "secret/app/db", &format!("password={V2}")]);
    let took = eventually("the rotation in vault-app", || {
        read("team-a", "vault-app", "/v/password") == V2
    });
    println!(
        "vault-app: the new value in the pod {:.1} s after the write",
        took.as_secs_f64()
    );

    // No binding selects team-a/stranger: keybroker's PermissionDenied reaches its event.
    eventually("the stranger's FailedMount event", || {
        events("team-a", "stranger", "FailedMount").contains("PermissionDenied")
    });
    let msg = events("team-a", "stranger", "FailedMount");
    println!("stranger's FailedMount: {msg}");
    assert!(
        !msg.contains(V1) && !msg.contains(V2) && !msg.contains("eyJ"),
        "{msg}"
    );
    assert_eq!(phase("team-a", "stranger"), "Pending");

    for (ns, name) in [
        ("team-a", "vault-app"),
        ("team-z", "azure-app"),
        ("team-z", "azure-upstream"),
        ("team-a", "stranger"),
    ] {
        must(&["delete", "pod", "-n", ns, name, "--wait=true"]);
    }
    // keybroker audited the reads and the denial (the provider's audit log on the host).
    let audit = std::fs::read_to_string(tmp.path().join("audit/audit.jsonl")).unwrap_or_default();
    assert!(
        audit.contains("vault-app") && audit.contains("azure-app"),
        "{audit}"
    );
    assert!(
        audit.contains("stranger"),
        "no denial of stranger in the audit log"
    );
    assert!(!audit.contains(V1) && !audit.contains(KV_SECRET));
    uninstall();
    uninstall_secrets_store_driver();
}
