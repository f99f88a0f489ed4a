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

/// The rendered DaemonSet upgrades by surge (the new pod takes the volumes over from the old
/// one), the fd keeper is a DaemonSet of its own (a pod deletion ends every container of the
/// pod: a keeper inside it would close the sessions with it) sharing its socket's host
/// directory with keybroker, and every container's arguments are accepted by the binary built
/// here.
#[test]
fn the_daemonset_keeps_fuse_sessions_across_restarts_and_upgrades() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keybroker.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let daemonset = |name: &str| -> serde_json::Value {
        text.split("\n---\n")
            .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
            .find(|v| v["kind"] == "DaemonSet" && v["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the {name} DaemonSet"))
    };
    let ds = daemonset("keybroker-node");
    let keeper_ds = daemonset("keybroker-fd-keeper");
    let strategy = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(strategy["maxSurge"], 1);
    assert_eq!(strategy["maxUnavailable"], 0);
    let spec = &ds["spec"]["template"]["spec"];
    assert!(
        spec["initContainers"].is_null(),
        "no keeper in the node pod"
    );
    // Upgrades do not restart the keeper (it would leave the sessions with keybroker alone).
    assert_eq!(keeper_ds["spec"]["updateStrategy"]["type"], "OnDelete");
    let keeper_spec = &keeper_ds["spec"]["template"]["spec"];
    let keeper = &keeper_spec["containers"][0];
    assert_eq!(keeper["name"], "fd-keeper");
    assert_eq!(keeper["securityContext"]["capabilities"]["drop"][0], "ALL");
    let node = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "keybroker")
        .unwrap();
    let args = |c: &serde_json::Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let socket_of = |args: &[String], flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
            .to_owned()
    };
    let (keeper_args, node_args) = (args(keeper), args(node));
    // keybroker registers itself with kubelet and answers its own probes: no sidecars that
    // cannot be built here (node-driver-registrar, livenessprobe).
    let names: Vec<&str> = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keybroker"], "only keybroker: {names:?}");
    let reg_dir = socket_of(&node_args, "--kubelet-registration-dir=");
    assert!(
        node["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == reg_dir.as_str()),
        "kubelet's plugins_registry is mounted at {reg_dir}"
    );
    assert!(
        socket_of(&node_args, "--kubelet-csi-socket=")
            .ends_with("/plugins/csi.keybroker.io/csi.sock")
    );
    // The node and its keeper run as root, the same uid (the image's default is 65532, which
    // can neither mount nor write the audit log on the host).
    assert_eq!(node["securityContext"]["runAsUser"], 0);
    assert_eq!(keeper["securityContext"]["runAsUser"], 0);
    assert_eq!(node["livenessProbe"]["httpGet"]["path"], "/healthz");
    let socket = socket_of(&keeper_args, "--socket=");
    assert_eq!(socket_of(&node_args, "--fd-keeper-socket="), socket);
    assert!(node_args.contains(&"--fd-keeper=external".to_owned()));
    // The socket's directory is the same host directory in both pods.
    let dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let host_dir_at = |pod: &serde_json::Value, c: &serde_json::Value| {
        let name = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir.as_str())
            .map(|m| m["name"].clone())
            .expect("the keeper's socket directory is mounted");
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["hostPath"]["path"].clone())
            .expect("a volume of that name")
    };
    let host_dir = host_dir_at(keeper_spec, keeper);
    assert!(host_dir.is_string(), "a host directory: {host_dir}");
    assert_eq!(host_dir, host_dir_at(spec, node));
    for a in [keeper_args, node_args] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(&a)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keybroker {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
