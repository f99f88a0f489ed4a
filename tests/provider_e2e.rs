//! `keybroker provider`: the Secrets Store CSI driver's provider API (v1alpha1), driven over
//! its unix socket with the requests the driver sends (a tonic client of the same proto).
//! Authorization, cache and audit are the node's: bound pods get files, unbound ones an error
//! code, and the driver's rotation re-Mounts cost no provider request while values are fresh.

mod common;

use std::collections::BTreeMap;

use common::azure::{APP, AzureStandin, TENANT};
use common::node::*;
use common::peers::{Issuer, TokenSpec};
use common::*;
use keybroker_csi::provider_pb::{self as pb, csi_driver_provider_client::CsiDriverProviderClient};
use serde_json::json;

/// Two files of the object `db`: one key, and the whole JSON.
const PASSWORD_AND_JSON: &str =
    "- objectName: password\n  object: db\n  key: password\n- objectName: db.json\n  object: db\n";

const DB: &str = r#"{"username":"app","password":"S3cret-provider-db-8841"}"#;

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    local_setup(DB, "[db]")
}

/// The attributes the driver sends: the SecretProviderClass parameters plus the pod info.
fn attributes(pod: &Pod, params: &[(&str, &str)], tokens: &str) -> String {
    let mut m: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("csi.storage.k8s.io/pod.name", pod.name.as_str()),
        ("csi.storage.k8s.io/pod.namespace", pod.ns),
        ("csi.storage.k8s.io/pod.uid", pod.uid.as_str()),
        ("csi.storage.k8s.io/serviceAccount.name", pod.sa),
        ("csi.storage.k8s.io/serviceAccount.tokens", tokens),
    ] {
        m.insert(k.into(), v.into());
    }
    serde_json::to_string(&m).unwrap()
}

fn mount_request(root: &std::path::Path, pod: &Pod, attributes: String) -> pb::MountRequest {
    pb::MountRequest {
        attributes,
        secrets: "{}".into(),
        target_path: root
            .join(format!(
                "kubelet/pods/{}/volumes/kubernetes.io~csi/store/mount",
                pod.uid
            ))
            .display()
            .to_string(),
        permission: "420".into(),
        current_object_version: vec![],
    }
}

async fn provider_client(d: &Daemon) -> CsiDriverProviderClient<tonic::transport::Channel> {
    CsiDriverProviderClient::new(keybroker_csi::connect_unix(&d.sock).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_pods_get_files_unbound_pods_an_error_code_and_re_mounts_are_free() {
    let (_tmp, root) = setup();
    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let mut c = provider_client(&d).await;
    let v = c
        .version(pb::VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.version.as_str(), v.runtime_name.as_str()),
        ("v1alpha1", "keybroker")
    );

    let pod = Pod::new("team-a", "api", 1);
    let objects = "- objectName: password\n  object: db\n  key: password\n- objectName: db.json\n  object: db\n  filePermission: \"0440\"\n";
    let tokens = sa_token(pod.ns, pod.sa, &pod.name, &pod.uid);
    let req = mount_request(
        &root,
        &pod,
        attributes(
            &pod,
            &[("provider", "local"), ("objects", objects)],
            &tokens,
        ),
    );
    let resp = c.mount(req.clone()).await.unwrap().into_inner();
    assert!(resp.error.is_none(), "{:?}", resp.error);
    let files: BTreeMap<&str, (&[u8], i32)> = resp
        .files
        .iter()
        .map(|f| (f.path.as_str(), (f.contents.as_slice(), f.mode)))
        .collect();
    assert_eq!(
        files["password"],
        (&b"S3cret-provider-db-8841"[..], 0o644),
        "the driver's permission"
    );
    assert_eq!(
        files["db.json"],
        (DB.as_bytes(), 0o440),
        "filePermission wins"
    );
    assert_eq!(resp.object_version.len(), 1, "one entry per object");
    assert_eq!(resp.object_version[0].id, "db");
    assert!(!resp.object_version[0].version.is_empty());
    let fetches = d.metric("keybroker_provider_fetches_total");

    // The driver's rotation poll: the same Mount again; the cache answers.
    for _ in 0..5 {
        let again = c.mount(req.clone()).await.unwrap().into_inner();
        assert_eq!(again.files.len(), 2);
    }
    assert_eq!(
        d.metric("keybroker_provider_fetches_total"),
        fetches,
        "re-Mounts are free"
    );

    // A pod no binding selects: an error code for the pod's events, no files, audited.
    let stranger = Pod::new("team-b", "api", 2);
    let tokens = sa_token(stranger.ns, stranger.sa, &stranger.name, &stranger.uid);
    let resp = c
        .mount(mount_request(
            &root,
            &stranger,
            attributes(
                &stranger,
                &[("provider", "local"), ("objects", objects)],
                &tokens,
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.error.unwrap().code, "PermissionDenied");
    assert!(resp.files.is_empty() && resp.object_version.is_empty());
    // Bad input from the driver's side is an InvalidArgument status.
    let mut bad = req.clone();
    bad.attributes = "[1,2]".into();
    assert_eq!(
        c.mount(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.permission = "2541".into();
    assert_eq!(
        c.mount(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    let audit = common::audit_text_when(&root.join("audit.jsonl"), "team-b's denial", |a| {
        a.contains("\"deny\"") && a.contains("team-b")
    });
    assert!(audit.contains("Secrets Store provider Mount"));
    assert!(!audit.contains("S3cret-provider-db-8841"));
    assert!(!d.logs().contains("S3cret-provider-db-8841"));
}

/// An Azure SecretProviderClass, in the Azure provider's parameter names, against the stand-in:
/// the files of a node volume, and re-Mounts that cost no Key Vault request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_secret_provider_class_is_served_from_the_cache() {
    require_root_and_fuse();
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    let standin = AzureStandin::start(&root, &[]);
    let mut issuer = Issuer::new(&root);
    issuer.serve_discovery(&root);
    let (tenant, app) = (TENANT, APP);
    standin.workload_identity(&issuer.iss, "team-a:api").await;
    standin
        .secret("kv1", "db-password", "S3cret-provider-azure-2201")
        .await;
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: wi\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {}\n    objects: [\"secret/*\"]\n",
            standin.binding_identity()
        ),
    );
    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let mut c = provider_client(&d).await;
    let objects = "array:\n  - |\n    objectName: db-password\n    objectType: secret\n";
    for i in 0..20 {
        let pod = Pod::new("team-a", "api", 10 + i);
        let tokens = issuer.kubelet_tokens(&[TokenSpec {
            ns: pod.ns,
            sa: pod.sa,
            pod: &pod.name,
            uid: &pod.uid,
            audience: "api://AzureADTokenExchange",
            expires_in: 3600,
        }]);
        let params = [
            ("keyvaultName", "kv1"),
            ("tenantId", tenant),
            ("clientID", app),
            ("usePodIdentity", "false"),
            ("objects", objects),
        ];
        let resp = c
            .mount(mount_request(
                &root,
                &pod,
                attributes(&pod, &params, &tokens),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.error.is_none(), "{:?}\n{}", resp.error, d.logs());
        assert_eq!(resp.files.len(), 1);
        assert_eq!(resp.files[0].path, "db-password");
        assert_eq!(resp.files[0].contents, b"S3cret-provider-azure-2201");
        assert_eq!(resp.object_version[0].id, "secret/db-password");
    }
    let gets = standin
        .requests()
        .await
        .iter()
        .filter(|r| r["kind"] == "keyvault" && r["status"] == 200)
        .count();
    assert_eq!(gets, 1, "20 pods' Mounts cost one Key Vault GET");
}

/// One SecretProviderClass case: service account, parameters, token audience, files.
type Case<'a> = (
    &'static str,
    &'a [(&'a str, &'a str)],
    &'static str,
    &'static [&'static str],
);

/// Runs the Secrets Store CSI driver's own provider client (tests/driver-harness: v1.6.0's
/// `PluginClientBuilder`, `Version`, `MountContent`, which also writes the files with the
/// driver's atomic writer) against keybroker's socket.
fn driver_mounts(
    providers_dir: &std::path::Path,
    requests: serde_json::Value,
) -> Vec<serde_json::Value> {
    use std::io::Write;
    let bin = common::peers::peers_bin("driver-harness");
    let mut child = std::process::Command::new(bin)
        .arg("-providers-dir")
        .arg(providers_dir)
        .args(["-provider", "csi"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(requests.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "driver-harness: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_drivers_own_client_mounts_through_keybroker() {
    let (_tmp, root) = setup();
    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let objects = PASSWORD_AND_JSON;
    let pod = Pod::new("team-a", "api", 1);
    let stranger = Pod::new("team-b", "api", 2);
    let request = |p: &Pod| {
        let tokens = sa_token(p.ns, p.sa, &p.name, &p.uid);
        let attrs: serde_json::Value = serde_json::from_str(&attributes(
            p,
            &[("provider", "local"), ("objects", objects)],
            &tokens,
        ))
        .unwrap();
        // A class without nodePublishSecretRef: the driver marshals a nil map, `null`.
        json!({
            "attributes": attrs,
            "secrets": null,
            "targetPath": root.join(format!("driver/{}/mount", p.uid)),
            "permission": "420",
        })
    };
    let results = driver_mounts(
        &root.join("csi"),
        json!([request(&pod), request(&pod), request(&stranger)]),
    );
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["errorCode"], "", "{:?}", results[0]);
    assert_eq!(results[0]["objectVersions"].as_object().unwrap().len(), 1);
    // The driver wrote the files, with its atomic writer, in the modes keybroker sent.
    let target = root.join(format!("driver/{}/mount", pod.uid));
    assert_eq!(
        std::fs::read_to_string(target.join("password")).unwrap(),
        "S3cret-provider-db-8841"
    );
    assert_eq!(std::fs::read_to_string(target.join("db.json")).unwrap(), DB);
    assert!(
        target.join("..data").is_symlink(),
        "the driver's atomic writer layout"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(target.join("password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    // The same pod again (the driver's rotation): fine, and free.
    assert_eq!(results[1]["errorCode"], "");
    assert_eq!(d.metric("keybroker_provider_fetches_total"), 1);
    // The unbound pod: the driver reports keybroker's code.
    assert_eq!(results[2]["errorCode"], "PermissionDenied");
    assert!(
        results[2]["error"]
            .as_str()
            .unwrap()
            .contains("PermissionDenied"),
        "{:?}",
        results[2]
    );
    assert!(
        !root
            .join(format!("driver/{}/mount/password", stranger.uid))
            .exists()
    );
}

/// A Vault and an Azure SecretProviderClass, in the parameter names those providers document,
/// mounted through the driver's own client, give the files a keybroker node volume with the same
/// attributes serves; the driver's rotation re-Mounts of 20 pods cost no request at OpenBao or
/// the Key Vault stand-in while the values are fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_and_azure_classes_give_the_files_of_node_volumes() {
    use common::peers::Bao;
    require_root_and_fuse();
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    // OpenBao: JWT auth trusting the issuer, role "app" for team-a/vaultapp, a KV v2 secret.
    let mut issuer = Issuer::new(&root);
    issuer.serve_discovery(&root);
    let bao = Bao::with_jwt_role(
        &root,
        &issuer,
        "team-a:vaultapp",
        common::peers::READ_APP_SECRETS,
    );
    bao.cli(&[
        "kv",
        "put",
        "secret/app/db",
        "username=app",
        "password=S3cret-provider-vault-5150",
    ]);
    // The stand-in: app with a federated credential for team-a/azureapp, vault kv1.
    let standin = AzureStandin::start(&root, &[]);
    let (tenant, app) = (TENANT, APP);
    standin
        .workload_identity(&issuer.iss, "team-a:azureapp")
        .await;
    standin
        .secret("kv1", "api-key", "S3cret-provider-azure-7070")
        .await;
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: vault\n    namespace: team-a\n    serviceAccounts: [vaultapp]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, caFile: \"{}\"}}}}\n    objects: [\"secret/data/app/*\"]\n  - name: azure\n    namespace: team-a\n    serviceAccounts: [azureapp]\n    identity: {}\n    objects: [\"secret/*\"]\n",
            bao.addr,
            bao.ca.display(),
            standin.binding_identity()
        ),
    );
    // The same parameters for both ways in.
    let vault_params = [
        ("roleName", "app"),
        ("vaultAddress", bao.addr.as_str()),
        ("vaultAuthMountPath", "jwt"),
        (
            "objects",
            "- objectName: db-password\n  secretPath: secret/data/app/db\n  secretKey: password\n- objectName: db-user\n  secretPath: secret/data/app/db\n  secretKey: username\n",
        ),
    ];
    let azure_objects = "array:\n  - |\n    objectName: api-key\n    objectType: secret\n";
    let azure_params = [
        ("keyvaultName", "kv1"),
        ("tenantId", tenant),
        ("clientID", app),
        ("objects", azure_objects),
    ];
    let token_for = |p: &Pod, audience: &str| {
        issuer.kubelet_tokens(&[TokenSpec {
            ns: p.ns,
            sa: p.sa,
            pod: &p.name,
            uid: &p.uid,
            audience,
            expires_in: 3600,
        }])
    };
    let cases: [Case; 2] = [
        (
            "vaultapp",
            &vault_params,
            "vault",
            &["db-password", "db-user"],
        ),
        (
            "azureapp",
            &azure_params,
            "api://AzureADTokenExchange",
            &["api-key"],
        ),
    ];

    // Node volumes first (keybroker node, CSI), then the provider behind the driver's client.
    let node_root = root.join("node");
    std::fs::create_dir_all(node_root.join("etc")).unwrap();
    std::fs::copy(
        root.join("etc/bindings.yaml"),
        node_root.join("etc/bindings.yaml"),
    )
    .unwrap();
    let mut expected: Vec<BTreeMap<String, Vec<u8>>> = Vec::new();
    {
        let d = Daemon::start_opts(&node_root, "1h", &node_root.join("audit.jsonl"), &[]);
        let mut node = client(&d).await;
        for (i, (sa, params, audience, files)) in cases.iter().enumerate() {
            let p = Pod::new("team-a", sa, 500 + i);
            let mut req = p.request_with(&node_root, params, None);
            req.secrets = std::collections::HashMap::from([(
                "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
                token_for(&p, audience),
            )]);
            node.node_publish_volume(req)
                .await
                .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
            let t = p.target(&node_root);
            expected.push(
                files
                    .iter()
                    .map(|f| (f.to_string(), std::fs::read(t.join(f)).unwrap()))
                    .collect(),
            );
            node.node_unpublish_volume(p.unpublish(&node_root))
                .await
                .unwrap();
        }
    }
    assert_eq!(expected[0]["db-password"], b"S3cret-provider-vault-5150");
    assert_eq!(expected[1]["api-key"], b"S3cret-provider-azure-7070");

    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let vault_reads = || bao.requests(|_, path| path.starts_with("secret/data/app"));
    let kv_gets = || async {
        standin
            .requests()
            .await
            .iter()
            .filter(|r| r["kind"] == "keyvault" && r["status"] == 200)
            .count()
    };
    let (reads0, gets0) = (vault_reads(), kv_gets().await);
    for (i, (sa, params, audience, files)) in cases.iter().enumerate() {
        // 20 pods of the identity, each mounted twice (the second is the driver's rotation poll).
        let pods: Vec<Pod> = (0..20)
            .map(|n| Pod::new("team-a", sa, 1000 * (i + 1) + n))
            .collect();
        let requests: Vec<serde_json::Value> = pods
            .iter()
            .chain(pods.iter())
            .map(|p| {
                let attrs: serde_json::Value =
                    serde_json::from_str(&attributes(p, params, &token_for(p, audience))).unwrap();
                // Tokens in the attributes and `secrets` the JSON `null`: what driver v1.6.0
                // sends for these classes (no nodePublishSecretRef, tokens in volume_context).
                json!({
                    "attributes": attrs,
                    "secrets": null,
                    "targetPath": root.join(format!("driver/{}/mount", p.uid)),
                    "permission": "292",
                })
            })
            .collect();
        let results = driver_mounts(&root.join("csi"), serde_json::Value::Array(requests));
        for r in &results {
            assert_eq!(r["errorCode"], "", "{r:?}\n{}", d.logs());
        }
        for p in &pods {
            let t = root.join(format!("driver/{}/mount", p.uid));
            for f in *files {
                assert_eq!(
                    std::fs::read(t.join(f)).unwrap(),
                    expected[i][*f],
                    "{sa} {f}"
                );
            }
        }
    }
    // 40 Mounts per class: one read per object at OpenBao (the KV secret is one object), one
    // GET at Key Vault.
    assert_eq!(vault_reads() - reads0, 1, "Vault reads for 40 Mounts");
    assert_eq!(kv_gets().await - gets0, 1, "Key Vault GETs for 40 Mounts");
}

/// The driver's rotation: every pod's volume is Mounted again each poll. 100 pods × 10 objects
/// through the driver's own client cost 10 provider fetches per cycle, not 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pods_rotating_through_the_driver_cost_ten_fetches_per_cycle() {
    let (_tmp, root) = setup();
    for o in 0..10 {
        std::fs::write(root.join(format!("secrets/obj{o}")), format!("value-{o}")).unwrap();
    }
    std::fs::write(
        root.join("etc/bindings.yaml"),
        format!(
            "bindings:\n  - name: apps\n    namespace: team-a\n    serviceAccounts: [api]\n    identity: {{local: {{path: {}}}}}\n    objects: [\"obj*\"]\n",
            root.join("secrets").display()
        ),
    )
    .unwrap();
    let d = Daemon::start_opts(&root, "2s", &root.join("audit.jsonl"), &["provider"]);
    let objects: String = (0..10).map(|o| format!("- objectName: obj{o}\n")).collect();
    let pods: Vec<Pod> = (0..100)
        .map(|i| Pod::new("team-a", "api", 100 + i))
        .collect();
    let requests = serde_json::Value::Array(
        pods.iter()
            .map(|p| {
                let tokens = sa_token(p.ns, p.sa, &p.name, &p.uid);
                let attrs: serde_json::Value = serde_json::from_str(&attributes(
                    p,
                    &[("provider", "local"), ("objects", &objects)],
                    &tokens,
                ))
                .unwrap();
                json!({
                    "attributes": attrs,
                    "secrets": {},
                    "targetPath": root.join(format!("driver/{}/mount", p.uid)),
                    "permission": "420",
                })
            })
            .collect(),
    );
    let fetches = || d.metric("keybroker_provider_fetches_total");
    let mut per_cycle = Vec::new();
    // An object is fetched at most once per poll interval (2 s) however many pods ask: a
    // cycle of 100 Mounts that takes longer than that (a loaded CI machine) may fetch it again.
    let mut allowed = Vec::new();
    for cycle in 0..4 {
        let before = fetches();
        let started = std::time::Instant::now();
        let results = driver_mounts(&root.join("csi"), requests.clone());
        assert!(results.iter().all(|r| r["errorCode"] == ""), "{results:?}");
        per_cycle.push(fetches() - before);
        allowed.push(10 * (1 + started.elapsed().as_millis() as u64 / 2000));
        if cycle == 0 {
            assert!(
                (10..=allowed[0]).contains(&per_cycle[0]),
                "the first cycle fetches each object once per poll interval: {per_cycle:?}, at most {allowed:?}"
            );
        }
        // The next poll (2 s, +0-10% jitter): every object is due again.
        std::thread::sleep(std::time::Duration::from_millis(2300));
    }
    assert!(
        per_cycle.iter().zip(&allowed).all(|(n, a)| n <= a),
        "{per_cycle:?}, at most {allowed:?}"
    );
    assert!(per_cycle[1..].iter().any(|n| *n >= 10), "{per_cycle:?}");
    let t = root.join(format!("driver/{}/mount", pods[99].uid));
    assert_eq!(std::fs::read_to_string(t.join("obj9")).unwrap(), "value-9");
}

/// The Secrets Store CSI driver itself (tests/driver-harness `-serve-csi`: v1.6.0's
/// `NewSecretsStoreDriver` serving CSI on a socket, its Kubernetes client a fake holding the
/// SecretProviderClasses and pods); stopped, and every mount it made under `root` detached, on
/// drop.
struct Driver {
    child: std::process::Child,
    root: std::path::PathBuf,
    sock: std::path::PathBuf,
}

impl Driver {
    fn start(
        root: &std::path::Path,
        providers_dir: &std::path::Path,
        objects: serde_json::Value,
    ) -> Self {
        let sock = root.join("driver/csi.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        std::fs::write(root.join("driver/objects.json"), objects.to_string()).unwrap();
        let log = std::fs::File::create(root.join("driver/driver.log")).unwrap();
        let child = std::process::Command::new(common::peers::peers_bin("driver-harness"))
            .arg("-providers-dir")
            .arg(providers_dir)
            .arg("-serve-csi")
            .arg(format!("unix://{}", sock.display()))
            .arg("-objects")
            .arg(root.join("driver/objects.json"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Driver {
            child,
            root: root.to_owned(),
            sock,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !d.sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the driver did not start: {}",
                d.logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.root.join("driver/driver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = wait_timeout(&mut self.child, std::time::Duration::from_secs(120));
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The driver's tmpfs mounts (source "tmpfs"), deepest first.
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<std::path::PathBuf> = mi
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(std::path::PathBuf::from)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        targets.sort();
        for t in targets.iter().rev() {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// kubelet's part against the driver's own node server: NodePublishVolume over the driver's
/// CSI socket names a SecretProviderClass; the driver mounts its tmpfs, Mounts through keybroker
/// (the provider) and writes the files with its atomic writer. A pod the bindings do not allow
/// gets the driver's error with keybroker's code, and no files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drivers_own_node_server_publishes_through_keybroker() {
    use keybroker_csi::pb::node_client::NodeClient;
    let (_tmp, root) = setup();
    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let objects = PASSWORD_AND_JSON;
    let pod = Pod::new("team-a", "api", 31);
    let stranger = Pod::new("team-b", "api", 32);
    let class = |ns: &str| {
        json!({
            "apiVersion": "secrets-store.csi.x-k8s.io/v1",
            "kind": "SecretProviderClass",
            "metadata": {"name": "store", "namespace": ns},
            // The provider's socket is <providers dir>/csi.sock here.
            "spec": {"provider": "csi", "parameters": {"provider": "local", "objects": objects}},
        })
    };
    let pod_object = |p: &Pod| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.ns, "uid": p.uid},
            "spec": {"serviceAccountName": p.sa, "nodeName": "keybroker-test-node"},
        })
    };
    let driver = Driver::start(
        &root,
        &root.join("csi"),
        json!({
            "classes": [class("team-a"), class("team-b")],
            "pods": [pod_object(&pod), pod_object(&stranger)],
        }),
    );
    let mut kubelet = NodeClient::new(keybroker_csi::connect_unix(&driver.sock).await.unwrap());
    let spc = [("secretProviderClass", "store")];
    // As kubelet publishes for the driver's own CSIDriver (no serviceAccountTokenInSecrets):
    // the tokens in volume_context and no secrets, so the driver sends keybroker `null`.
    let mut req = pod.request_with(&root, &spc, None);
    let tokens = req.secrets.drain().collect::<Vec<_>>();
    req.volume_context.extend(tokens);
    kubelet
        .node_publish_volume(req)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}\n{}", driver.logs(), d.logs()));
    let target = pod.target(&root);
    assert!(is_mount_point(&target), "the driver's own tmpfs");
    assert_eq!(
        std::fs::read_to_string(target.join("password")).unwrap(),
        "S3cret-provider-db-8841"
    );
    assert_eq!(std::fs::read_to_string(target.join("db.json")).unwrap(), DB);
    assert!(
        target.join("..data").is_symlink(),
        "the driver's atomic writer"
    );
    assert_eq!(d.metric("keybroker_provider_fetches_total"), 1);

    let e = kubelet
        .node_publish_volume(stranger.request_with(&root, &spc, None))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("PermissionDenied"),
        "the driver reports keybroker's code: {}",
        e.message()
    );
    assert!(!stranger.target(&root).join("password").exists());
    let audit = common::audit_text_when(&root.join("audit.jsonl"), "the refusal", |a| {
        a.contains("\"deny\"")
    });
    assert!(!audit.contains("S3cret-provider-db"));

    kubelet
        .node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    assert!(!is_mount_point(&target), "the driver unmounted its tmpfs");

    // With serviceAccountTokenInSecrets (Kubernetes ≥ 1.35) the tokens come in `secrets`, and
    // the driver hands keybroker that map.
    let again = Pod::new("team-a", "api", 33);
    kubelet
        .node_publish_volume(again.request_with(&root, &spc, None))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}\n{}", driver.logs(), d.logs()));
    assert_eq!(
        std::fs::read_to_string(again.target(&root).join("password")).unwrap(),
        "S3cret-provider-db-8841"
    );
    kubelet
        .node_unpublish_volume(again.unpublish(&root))
        .await
        .unwrap();
    drop(driver);
}

/// A Mount the provider edge cannot parse is refused with the reason, and that refusal is in
/// keybroker's log and audit log like every other (not only in the driver's event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_mount_is_refused_logged_and_audited() {
    let (_tmp, root) = setup();
    let d = Daemon::start_opts(&root, "1h", &root.join("audit.jsonl"), &["provider"]);
    let mut c = provider_client(&d).await;
    let pod = Pod::new("team-a", "api", 41);
    let attrs = attributes(
        &pod,
        &[("provider", "local"), ("objects", PASSWORD_AND_JSON)],
        "",
    );
    let mut req = mount_request(&root, &pod, attrs);
    req.secrets = "[\"not-a-map-S3cret\"]".into();
    let e = c.mount(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("secrets is not a JSON map"), "{e:?}");
    assert!(!e.message().contains("S3cret"));
    let log = root.join("audit.jsonl");
    let refusal = || {
        audit_records(&log)
            .into_iter()
            .find(|r| r.to_string().contains("the driver's Mount request"))
    };
    wait_for(
        "the refusal's audit record",
        std::time::Duration::from_secs(60),
        || refusal().is_some(),
    );
    let rec = refusal().unwrap();
    let audit = std::fs::read_to_string(&log).unwrap();
    assert_eq!(rec["event"], "error", "{rec}");
    assert!(
        rec["volume"].as_str().unwrap().contains(&pod.uid),
        "names the driver's target: {rec}"
    );
    assert!(!audit.contains("S3cret"));
    assert!(
        d.logs().contains("secrets is not a JSON map"),
        "{}",
        d.logs()
    );
}

/// The driver never says when a pod is gone (the provider API has no unmount): a volume no
/// Mount asks for within `--forget-idle-after` is forgotten, and what no other volume uses
/// leaves memory: the cached value, the pod's service-account token, the Vault login. Leases
/// and tokens are not revoked (a pod whose driver does not rotate still uses its files). A
/// forgotten volume asked for again is simply served again. Against a real OpenBao.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_no_mount_asks_for_are_forgotten_and_their_values_leave_memory() {
    use common::peers::Bao;
    const VALUE: &str = "S3cret-provider-idle-3131";
    let tmp = open_tempdir();
    let root = tmp.path().to_owned();
    for dir in ["etc", "csi"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let mut issuer = Issuer::new(&root);
    issuer.serve_discovery(&root);
    let bao = Bao::with_jwt_role(
        &root,
        &issuer,
        "team-a:vaultapp",
        common::peers::READ_APP_SECRETS,
    );
    bao.cli(&["kv", "put", "secret/app/db", &format!("password={VALUE}")]);
    common::write_bindings(
        &root,
        &format!(
            "bindings:\n  - name: vault\n    namespace: team-a\n    serviceAccounts: [vaultapp]\n    identity: {{vault: {{address: \"{}\", authMount: jwt, role: app, caFile: \"{}\"}}}}\n    objects: [\"secret/data/app/*\"]\n",
            bao.addr,
            bao.ca.display(),
        ),
    );
    let params = [
        ("roleName", "app"),
        ("vaultAddress", bao.addr.as_str()),
        ("vaultAuthMountPath", "jwt"),
        (
            "objects",
            "- objectName: db-password\n  secretPath: secret/data/app/db\n  secretKey: password\n",
        ),
    ];
    let d = Daemon::start_opts(
        &root,
        "1h",
        &root.join("audit.jsonl"),
        &["provider", "--forget-idle-after", "3s"],
    );
    let mut c = provider_client(&d).await;
    let (a, b) = (
        Pod::new("team-a", "vaultapp", 61),
        Pod::new("team-a", "vaultapp", 62),
    );
    let request = |p: &Pod| {
        let tokens = issuer.kubelet_tokens(&[TokenSpec {
            ns: p.ns,
            sa: p.sa,
            pod: &p.name,
            uid: &p.uid,
            audience: "vault",
            expires_in: 3600,
        }]);
        mount_request(&root, p, attributes(p, &params, &tokens))
    };
    let (ra, rb) = (request(&a), request(&b));
    let mut mount = async |r: &pb::MountRequest| {
        let resp = c.mount(r.clone()).await.unwrap().into_inner();
        assert!(resp.error.is_none(), "{:?}\n{}", resp.error, d.logs());
        assert_eq!(resp.files[0].contents, VALUE.as_bytes());
    };
    let logins = || bao.requests(|_, path| path == "auth/jwt/login");
    let reads = || bao.requests(|_, path| path == "secret/data/app/db");
    mount(&ra).await;
    mount(&rb).await;
    assert_eq!(
        (logins(), reads()),
        (1, 1),
        "one login and one read for both"
    );
    assert_eq!(d.metric("keybroker_provider_volumes"), 2);
    assert_eq!(d.metric("keybroker_cached_values"), 1);

    // Pod a's driver keeps rotating (a Mount every half second); pod b's went away.
    let started = std::time::Instant::now();
    while d.metric("keybroker_provider_volumes") > 1 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "pod b was never forgotten\n{}",
            d.logs()
        );
        mount(&ra).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    mount(&ra).await;
    assert_eq!(
        d.metric("keybroker_cached_values"),
        1,
        "a's value stays cached"
    );
    assert_eq!((logins(), reads()), (1, 1), "a is still served from memory");

    // No Mount at all: a is forgotten too, and the value leaves memory.
    let started = std::time::Instant::now();
    while d.metric("keybroker_provider_volumes") > 0 || d.metric("keybroker_cached_values") > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "pod a's volume and value were never forgotten\n{}",
            d.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(d.logs().contains("forgot Secrets Store volumes"));

    // b's pod comes back (or a new Mount of it): served again, with a fresh login (the
    // identity's login went with its last volume) and a fresh read.
    mount(&rb).await;
    assert_eq!(
        (logins(), reads()),
        (2, 2),
        "a new login and read after forgetting"
    );
    // Nothing was revoked: the first login's token and what it read simply expire.
    assert_eq!(
        bao.requests(|_, path| path.starts_with("auth/token/revoke")),
        0
    );
    assert!(!d.logs().contains(VALUE));
    assert!(
        !std::fs::read_to_string(root.join("audit.jsonl"))
            .unwrap()
            .contains(VALUE)
    );
}
