//! Rotation notices to applications: a signal to processes found by name, or an HTTP
//! request to a local endpoint. Used by the sidecar (any process the pod shares) and by node
//! volumes (only processes in the volume's pod, from their cgroup).

use std::time::Duration;

/// Sends `signal` to every process named `name` that this process can see (the pod's, with
/// `shareProcessNamespace: true`).
pub fn signal_by_name(name: &str, signal: i32, pod_uid: Option<&str>) -> Result<(), String> {
    let me = std::process::id();
    let mut sent = 0;
    for e in std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        // In node mode only the pod's own processes (from their cgroup) are signalled.
        if let Some(want) = pod_uid {
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            if crate::procinfo::parse_cgroup(&cgroup).0.as_deref() != Some(want) {
                continue;
            }
        }
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(|e| e.to_string())?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| format!("cannot signal {name} (pid {pid}): {e}"))?;
        sent += 1;
    }
    if sent == 0 {
        return Err(match pod_uid {
            None => format!(
                "no process named {name:?} is visible: the pod needs shareProcessNamespace: true for signal notices"
            ),
            Some(uid) => format!("no process named {name:?} runs in pod {uid}"),
        });
    }
    Ok(())
}

pub async fn http_notice(url: &str, method: &str, timeout: Duration) -> Result<(), String> {
    let client = crate::tls::client_builder(None, "rotation notice")?
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let resp = client
        .request(m, url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", resp.status()))
    }
}
