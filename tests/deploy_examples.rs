//! The sidecar and init configs shipped in deploy/examples (ConfigMaps named *-keybroker) are
//! valid keybroker configs, as `keybroker init`/`sidecar` would load them in those pods.

use std::path::Path;

#[test]
fn example_pod_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in text.split("\n---\n") {
            let v: serde_json::Value = match serde_norway::from_str(doc) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v["kind"] != "ConfigMap" {
                continue;
            }
            let Some(config) = v["data"]["config.yaml"].as_str() else {
                continue;
            };
            // The Azure workload identity webhook's environment, as the pod would have it.
            let env = |k: &str| match k {
                "AZURE_TENANT_ID" => Some("72f988bf-86f1-41af-91ab-2d7cd011db47".to_string()),
                "AZURE_CLIENT_ID" => Some("5c9e8f61-2b1a-4d3e-9f00-6a7b8c9d0e1f".to_string()),
                "AZURE_FEDERATED_TOKEN_FILE" => {
                    Some("/var/run/secrets/azure/tokens/azure-identity-token".to_string())
                }
                _ => None,
            };
            keybroker::config::MountConfig::parse_env(
                config,
                &path,
                Path::new("/etc/keybroker"),
                &env,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} example configs");
}
