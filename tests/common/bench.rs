//! Small helpers the benches share (benches/ include this module tree by path).

/// The `p` quantile (0.0 to 1.0) of `v`, nearest rank; sorts `v`.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A `kB` field of /proc/<pid>/status (`"VmRSS:"`, `"RssAnon:"`) or a count (`"Threads:"`);
/// NaN when the process is gone.
pub fn status_kib(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// VmRSS of a process in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}
