//! Prometheus metrics and health endpoints of `keybroker node`, on a small HTTP/1.1 listener
//! (`GET /metrics`, `/healthz`, `/readyz`). Counters only name volumes' counts and outcomes,
//! never pods' attributes or values.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::NodeService;

/// Latency buckets of NodePublishVolume, seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    pub publishes: AtomicU64,
    pub republishes: AtomicU64,
    pub publish_errors: AtomicU64,
    pub unpublishes: AtomicU64,
    pub denials: AtomicU64,
    pub repairs: AtomicU64,
    pub bindings_reload_errors: AtomicU64,
    /// Rotations of volumes that have since been unpublished (live volumes report their own).
    pub rotations_retired: AtomicU64,
    /// Times every FUSE session was given to the fd keeper (start, a keeper that came back).
    pub keeper_syncs: AtomicU64,
    /// Handovers to a newer process that did not complete (this process serves on).
    pub handovers_rolled_back: AtomicU64,
    publish_latency_buckets: [AtomicU64; BUCKETS.len()],
    publish_latency_count: AtomicU64,
    publish_latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn observe_publish(&self, d: Duration, _ok: bool) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.publish_latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.publish_latency_count.fetch_add(1, Ordering::Relaxed);
        self.publish_latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

type Row = (&'static str, &'static str, u64);

/// The counters: (name, help, value).
fn counters(node: &NodeService) -> [Row; 17] {
    let m = &node.metrics;
    let c = &node.cache().stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    [
        (
            "keybroker_publishes_total",
            "Volumes published (first publish).",
            get(&m.publishes),
        ),
        (
            "keybroker_republishes_total",
            "Republishes of healthy volumes (cheap path).",
            get(&m.republishes),
        ),
        (
            "keybroker_publish_errors_total",
            "NodePublishVolume calls that failed (not denials).",
            get(&m.publish_errors),
        ),
        (
            "keybroker_unpublishes_total",
            "NodeUnpublishVolume calls.",
            get(&m.unpublishes),
        ),
        (
            "keybroker_denials_total",
            "Requests denied by bindings or token checks.",
            get(&m.denials),
        ),
        (
            "keybroker_repairs_total",
            "Dead volume mounts replaced.",
            get(&m.repairs),
        ),
        (
            "keybroker_bindings_reload_errors_total",
            "Bindings reloads that failed (previous bindings kept).",
            get(&m.bindings_reload_errors),
        ),
        (
            "keybroker_rotations_total",
            "Refreshes that changed a volume's files.",
            node.rotations(),
        ),
        (
            "keybroker_provider_fetches_total",
            "Fetches that reached a provider.",
            get(&c.provider_fetches),
        ),
        (
            "keybroker_cache_hits_total",
            "Object requests served from the node cache.",
            get(&c.hits),
        ),
        (
            "keybroker_stale_served_total",
            "Times the last good value was served because a refresh failed.",
            get(&c.stale_served),
        ),
        (
            "keybroker_fetch_failures_total",
            "Provider fetches that failed.",
            get(&c.failures),
        ),
        (
            "keybroker_keeper_syncs_total",
            "Times every FUSE session was given to the fd keeper (at start, and each time a keeper came back).",
            get(&m.keeper_syncs),
        ),
        (
            "keybroker_handovers_rolled_back_total",
            "Handovers to a newer process that did not complete; this process served on.",
            get(&m.handovers_rolled_back),
        ),
        (
            "keybroker_tmpfs_opens_total",
            "Opens of tmpfs volumes' files seen through fanotify (before coalescing).",
            node.opens.as_ref().map_or(0, |o| o.opens()),
        ),
        (
            "keybroker_tmpfs_opens_refused_total",
            "Opens of tmpfs volumes' files refused by a binding's readers policy.",
            node.opens.as_ref().map_or(0, |o| o.refusals()),
        ),
        (
            "keybroker_audit_write_errors_total",
            "Failed attempts to write the audit log (retries included).",
            node.audit().write_errors(),
        ),
    ]
}

/// The gauges: (name, help, value).
fn gauges(node: &NodeService) -> [Row; 11] {
    [
        (
            "keybroker_audit_healthy",
            "1 while the audit log can be written, 0 while writes fail.",
            u64::from(node.audit().healthy()),
        ),
        (
            "keybroker_fuse_sessions_lingering",
            "Unpublished FUSE volumes still served because another mount namespace holds them.",
            crate::volume::fuse::lingering_sessions(),
        ),
        (
            "keybroker_fuse_sessions_unkept",
            "FUSE sessions no fd keeper holds: a restart of keybroker now would break them (also in /readyz).",
            node.unkept_sessions() as u64,
        ),
        (
            "keybroker_volumes",
            "Volumes published on this node.",
            node.volume_count() as u64,
        ),
        (
            "keybroker_provider_volumes",
            "Provider mode: Secrets Store volumes remembered (a Mount within --forget-idle-after).",
            node.provider_mounts() as u64,
        ),
        (
            "keybroker_cached_values",
            "Values in the node-wide cache (in memory, zeroized when dropped).",
            node.cache().len() as u64,
        ),
        (
            "keybroker_max_staleness_seconds",
            "Seconds since the least recently refreshed volume refreshed cleanly.",
            node.max_staleness(),
        ),
        (
            "keybroker_kubelet_registered",
            "1 once kubelet has registered the plugin (--kubelet-registration-dir), else 0.",
            u64::from(node.kubelet_registered()),
        ),
        (
            "keybroker_open_wait_lone_max_answers",
            "Most other opens answered while a tmpfs open whose pod had nothing else waiting waited (fair turns bound it by 2 x pods waiting - 1).",
            node.opens
                .as_ref()
                .map_or(0, |o| o.fairness().lone_waited_behind),
        ),
        (
            "keybroker_open_wait_longest_line",
            "Most tmpfs opens of one pod (or one process outside pods) seen waiting at once.",
            node.opens.as_ref().map_or(0, |o| o.fairness().longest_line),
        ),
        (
            "keybroker_resident_memory_bytes",
            "Resident memory of the daemon.",
            crate::procinfo::resident_bytes(std::process::id()).unwrap_or(0),
        ),
    ]
}

/// The metrics page.
pub fn render(node: &NodeService) -> String {
    let m = &node.metrics;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (counters, gauges) = (counters(node), gauges(node));
    let mut out = String::new();
    for (kind, rows) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP keybroker_publish_duration_seconds NodePublishVolume latency.\n# TYPE keybroker_publish_duration_seconds histogram"
    );
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "keybroker_publish_duration_seconds_bucket{{le=\"{b}\"}} {}",
            get(&m.publish_latency_buckets[i])
        );
    }
    let n = get(&m.publish_latency_count);
    let _ = writeln!(
        out,
        "keybroker_publish_duration_seconds_bucket{{le=\"+Inf\"}} {n}"
    );
    let _ = writeln!(
        out,
        "keybroker_publish_duration_seconds_sum {}",
        get(&m.publish_latency_sum_us) as f64 / 1e6
    );
    let _ = writeln!(out, "keybroker_publish_duration_seconds_count {n}");
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, node: Arc<NodeService>, shutdown: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            // Read the request head (bounded, with a deadline).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match (head.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", render(&node)),
                (true, "/healthz") => ("200 OK", "ok\n".to_string()),
                (true, "/readyz") => match node.not_ready_reason() {
                    None => ("200 OK", "ready\n".to_string()),
                    Some(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
                },
                (true, _) => ("404 Not Found", "not found\n".to_string()),
                (false, _) => ("405 Method Not Allowed", "GET only\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
