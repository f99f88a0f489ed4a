//! `keybroker audit report`: one self-contained HTML page for a time range (no script, no
//! font, no request: a Content-Security-Policy of `default-src 'none'` holds it to that).
//!
//! At the top, the verification of the whole log: every segment, the chain, the signed
//! checkpoints. Then, per secret (object), who read it: pods, containers, executables, with
//! counts, first and last time and a timeline (inline SVG), readers flagged when they deserve
//! a look (first seen, an interactive shell, outside the pod's containers, uid 0); then
//! denials with their reasons, gaps, rotations. Everything is aggregated while the log is read
//! once, so a month of a busy node is a page of bounded size.
//!
//! "First seen" means: this workload (namespace and service account) had not read this object
//! with this executable (or command, when the executable is unknown) in any record kept before
//! the range. Pod names change with every rollout; the workload is what an auditor follows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::*;

/// Timeline buckets per object.
const BUCKETS: usize = 48;
/// Readers listed per object (the most notable first); objects listed.
const MAX_READERS: usize = 40;
const MAX_OBJECTS: usize = 300;
const MAX_LISTED: usize = 200;

/// Commands that are interactive shells (a person, or someone's script, at a prompt).
const SHELLS: &[&str] = &["sh", "bash", "ash", "dash", "zsh", "ksh", "fish", "busybox"];

#[derive(Default)]
struct Reader {
    count: u64,
    first: String,
    last: String,
    uid0: bool,
    outside: bool,
    shell: bool,
    first_seen: bool,
}

/// A reader: pod, container, executable (or command), command.
type ReaderKey = (String, String, String, String);

#[derive(Default)]
struct Object {
    reads: u64,
    buckets: Vec<u64>,
    readers: BTreeMap<ReaderKey, Reader>,
    rotations: u64,
    last_version: String,
}

/// What a report says about a time range.
#[derive(Default)]
pub struct Report {
    since: String,
    until: String,
    objects: BTreeMap<String, Object>,
    denials: BTreeMap<(String, String), (u64, String, String)>,
    gaps: Vec<(String, String)>,
    errors: u64,
    records_in_range: u64,
    records_read: u64,
    /// Workload, object and executable seen before the range.
    known: BTreeSet<(String, String, String)>,
    range: Option<(SystemTime, SystemTime)>,
}

impl Report {
    /// A report of records from `since` to `until` (RFC 3339 as records write it).
    pub fn new(since: &str, until: &str) -> Self {
        let range = humantime::parse_rfc3339_weak(since)
            .ok()
            .zip(humantime::parse_rfc3339_weak(until).ok());
        Self {
            since: since.to_owned(),
            until: until.to_owned(),
            range,
            ..Default::default()
        }
    }

    /// Takes one record (all records of the log, in order: those before the range teach
    /// which readers are known).
    pub fn add(&mut self, v: &RecordView<'_>) {
        self.records_read += 1;
        let time = v.time();
        let event = v.event();
        let object = match t(&v.object) {
            "" => t(&v.file),
            o => o,
        };
        let workload = format!("{}/{}", v.namespace(), v.service_account());
        let exe = match v.exe() {
            "" => v.comm(),
            e => e,
        };
        if time < self.since.as_str() {
            if event == "read" {
                self.known
                    .insert((workload, object.to_owned(), exe.to_owned()));
            }
            return;
        }
        if time > self.until.as_str() {
            return;
        }
        self.records_in_range += 1;
        match event {
            "read" => self.read(v, time, object, workload, exe),
            "deny" => {
                let who = match v.pod_name() {
                    "" => t(&v.volume).to_owned(),
                    name => format!("{}/{name}", v.namespace()),
                };
                let why = [t(&v.reason), t(&v.error), t(&v.detail)]
                    .into_iter()
                    .find(|w| !w.is_empty())
                    .unwrap_or("denied")
                    .chars()
                    .take(300)
                    .collect::<String>();
                let e =
                    self.denials
                        .entry((who, why))
                        .or_insert((0, time.to_owned(), String::new()));
                e.0 += 1;
                e.2 = time.to_owned();
            }
            "gap" if self.gaps.len() < MAX_LISTED => {
                self.gaps
                    .push((time.to_owned(), t(&v.detail).chars().take(400).collect()));
            }
            "rotate" => {
                if let Some(o) = self.object(object) {
                    o.rotations += 1;
                    o.last_version = t(&v.version).to_owned();
                }
            }
            "error" => self.errors += 1,
            _ => {}
        }
    }

    fn object(&mut self, name: &str) -> Option<&mut Object> {
        if !self.objects.contains_key(name) && self.objects.len() >= MAX_OBJECTS {
            return None;
        }
        Some(
            self.objects
                .entry(name.to_owned())
                .or_insert_with(|| Object {
                    buckets: vec![0; BUCKETS],
                    ..Default::default()
                }),
        )
    }

    fn read(&mut self, v: &RecordView<'_>, time: &str, object: &str, workload: String, exe: &str) {
        let n = v.count.unwrap_or(1);
        let bucket = self.bucket(time);
        let first_seen = self
            .known
            .insert((workload, object.to_owned(), exe.to_owned()));
        let comm = v.comm().to_owned();
        let shell = SHELLS.contains(&comm.as_str())
            || SHELLS.iter().any(|sh| exe.rsplit('/').next() == Some(*sh));
        let pod = match v.pod_name() {
            "" => t(&v.volume).to_owned(),
            name => format!("{}/{name}", v.namespace()),
        };
        let container = match v.container() {
            "" if outside_pod(v) => "(not in the pod)".to_owned(),
            "" => String::new(),
            c => c.chars().take(12).collect(),
        };
        let uid0 = v.reader_uid() == Some(0);
        let outside = outside_pod(v);
        let Some(o) = self.object(object) else { return };
        o.reads += n;
        if let Some(b) = bucket {
            o.buckets[b] += n;
        }
        let key = (pod, container, exe.to_owned(), comm);
        if !o.readers.contains_key(&key) && o.readers.len() >= 10 * MAX_READERS {
            return;
        }
        let r = o.readers.entry(key).or_insert_with(|| Reader {
            first: time.to_owned(),
            ..Default::default()
        });
        r.count += n;
        r.last = time.to_owned();
        r.uid0 |= uid0;
        r.outside |= outside;
        r.shell |= shell;
        r.first_seen |= first_seen;
    }

    fn bucket(&self, time: &str) -> Option<usize> {
        let (a, b) = self.range?;
        let t = humantime::parse_rfc3339_weak(time).ok()?;
        let span = b.duration_since(a).ok()?.as_secs_f64().max(1.0);
        let at = t.duration_since(a).ok()?.as_secs_f64();
        Some(((at / span * BUCKETS as f64) as usize).min(BUCKETS - 1))
    }

    /// The page. `verification` is the whole log's verdict, `segments` what it is made of.
    pub fn html(&self, log: &str, verification: &str, ok: bool, segments: &[String]) -> String {
        let mut h = String::with_capacity(64 << 10);
        let _ = write!(
            h,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
             <title>keybroker audit report: {}</title><style>{CSS}</style></head><body>\
             <h1>Audit report</h1><p class=\"sub\">{} &mdash; from {} to {} (UTC); {} records in the range, {} read</p>",
            esc(log),
            esc(log),
            esc(&self.since),
            esc(&self.until),
            self.records_in_range,
            self.records_read
        );
        let _ = write!(
            h,
            "<section id=\"verification\" class=\"{}\"><h2>Verification</h2><p>{}</p>",
            if ok { "ok" } else { "bad" },
            esc(verification)
        );
        if !segments.is_empty() {
            h.push_str("<details><summary>Segments</summary><ul>");
            for seg in segments {
                let _ = write!(h, "<li>{}</li>", esc(seg));
            }
            h.push_str("</ul></details>");
        }
        h.push_str("</section>");
        self.secrets_html(&mut h);
        self.denials_html(&mut h);
        h.push_str("<section id=\"gaps\"><h2>Gaps</h2>");
        if self.gaps.is_empty() {
            h.push_str("<p>None: no span in which events may be missing.</p>");
        } else {
            h.push_str("<table><tr><th>time</th><th>what may be missing</th></tr>");
            for (t, d) in &self.gaps {
                let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(t), esc(d));
            }
            h.push_str("</table>");
        }
        let _ = write!(
            h,
            "</section><p class=\"sub\">{} error records in the range. Generated by keybroker audit report.</p></body></html>",
            self.errors
        );
        h
    }

    fn secrets_html(&self, h: &mut String) {
        h.push_str("<section id=\"secrets\"><h2>Secrets and their readers</h2>");
        if self.objects.is_empty() {
            h.push_str("<p>No reads in the range.</p>");
        }
        let mut objects: Vec<(&String, &Object)> = self.objects.iter().collect();
        objects.sort_by(|a, b| b.1.reads.cmp(&a.1.reads).then(a.0.cmp(b.0)));
        for (name, o) in objects {
            let flagged = o
                .readers
                .values()
                .filter(|r| r.first_seen || r.shell || r.outside || r.uid0)
                .count();
            let _ = write!(
                h,
                "<article class=\"object\"><h3>{}</h3><p>{} reads by {} readers{}; {} rotations{}</p>{}",
                esc(name),
                o.reads,
                o.readers.len(),
                if flagged > 0 {
                    format!(", <b class=\"flag\">{flagged} flagged</b>")
                } else {
                    String::new()
                },
                o.rotations,
                if o.last_version.is_empty() {
                    String::new()
                } else {
                    format!(" (now version {})", esc(&o.last_version))
                },
                timeline(&o.buckets)
            );
            h.push_str(
                "<table><tr><th>pod</th><th>container</th><th>executable</th><th>command</th><th>reads</th><th>first</th><th>last</th><th>flags</th></tr>",
            );
            let mut readers: Vec<(&ReaderKey, &Reader)> = o.readers.iter().collect();
            let score = |r: &Reader| {
                u8::from(r.outside) * 8
                    + u8::from(r.shell) * 4
                    + u8::from(r.first_seen) * 2
                    + u8::from(r.uid0)
            };
            readers.sort_by(|a, b| score(b.1).cmp(&score(a.1)).then(b.1.count.cmp(&a.1.count)));
            for ((pod, container, exe, comm), r) in readers.iter().take(MAX_READERS) {
                let mut flags = Vec::new();
                if r.outside {
                    flags.push("outside the pod");
                }
                if r.shell {
                    flags.push("interactive shell");
                }
                if r.first_seen {
                    flags.push("first seen");
                }
                if r.uid0 {
                    flags.push("uid 0");
                }
                let _ = write!(
                    h,
                    "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    if score(r) >= 2 {
                        " class=\"flagged\""
                    } else {
                        ""
                    },
                    esc(pod),
                    esc(container),
                    esc(exe),
                    esc(comm),
                    r.count,
                    esc(&r.first),
                    esc(&r.last),
                    flags.join(", ")
                );
            }
            if readers.len() > MAX_READERS {
                let _ = write!(
                    h,
                    "<tr><td colspan=\"8\">{} more readers (keybroker audit query lists them)</td></tr>",
                    readers.len() - MAX_READERS
                );
            }
            h.push_str("</table></article>");
        }
        h.push_str("</section>");
    }

    fn denials_html(&self, h: &mut String) {
        h.push_str("<section id=\"denials\"><h2>Denials</h2>");
        if self.denials.is_empty() {
            h.push_str("<p>None.</p></section>");
            return;
        }
        h.push_str(
            "<table><tr><th>who</th><th>why</th><th>times</th><th>first</th><th>last</th></tr>",
        );
        for ((who, why), (n, first, last)) in self.denials.iter().take(MAX_LISTED) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{n}</td><td>{}</td><td>{}</td></tr>",
                esc(who),
                esc(why),
                esc(first),
                esc(last)
            );
        }
        h.push_str("</table></section>");
    }
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{margin:0}\
.sub{color:#666}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;\
padding:2px 6px;text-align:left;font-size:13px}th{background:#f4f4f4}.ok{border-left:6px solid #2a2;\
padding-left:1em}.bad{border-left:6px solid #c22;padding-left:1em;background:#fee}.flag{color:#c22}\
tr.flagged{background:#fff3e0}svg{display:block;margin:.3em 0}article{margin-bottom:2em}";

/// Bars of reads per bucket of the range, as inline SVG.
fn timeline(buckets: &[u64]) -> String {
    let max = buckets.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut svg = format!(
        "<svg width=\"{}\" height=\"40\" role=\"img\" aria-label=\"reads over the range\">",
        buckets.len() * 10
    );
    for (i, n) in buckets.iter().enumerate() {
        let hgt = if *n == 0 {
            0.0
        } else {
            (*n as f64 / max * 38.0).max(1.0)
        };
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"8\" height=\"{hgt:.1}\" fill=\"#4a7\"><title>{n}</title></rect>",
            i * 10,
            40.0 - hgt
        );
    }
    svg.push_str("</svg>");
    svg
}

/// HTML text: names come from pods (objects, files, commands) and must stay text.
pub fn esc(t: &str) -> String {
    let mut o = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if super::view::hides_text(c) => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(time: &str, comm: &str, exe: &str, pod_uid: &str, uid: u32) -> String {
        serde_json::json!({"time": time, "event": "read", "object": "secret/<db>", "file": "password",
            "pod": {"namespace": "payments", "name": "api-1", "uid": "u1", "service_account": "api"},
            "process": {"pid": 7, "uid": uid, "gid": 0, "comm": comm, "exe": exe, "pod_uid": pod_uid, "container": "c0ffee00c0ffee00"}})
        .to_string()
    }

    fn add(r: &mut Report, line: &str) {
        r.add(&RecordView::parse(line.as_bytes()).unwrap());
    }

    #[test]
    fn readers_are_aggregated_flagged_and_escaped() {
        let mut r = Report::new("2026-12-01T00:00:00.000000Z", "2026-12-02T00:00:00.000000Z");
        // Known before the range: the app.
        add(
            &mut r,
            &read(
                "2026-11-30T12:00:00.000000Z",
                "app",
                "/app/server",
                "u1",
                1000,
            ),
        );
        for _ in 0..3 {
            add(
                &mut r,
                &read(
                    "2026-12-01T10:00:00.000000Z",
                    "app",
                    "/app/server",
                    "u1",
                    1000,
                ),
            );
        }
        add(
            &mut r,
            &read("2026-12-01T11:00:00.000000Z", "bash", "/bin/bash", "u1", 0),
        );
        add(
            &mut r,
            &read(
                "2026-12-01T12:00:00.000000Z",
                "cat",
                "/usr/bin/cat",
                "u9",
                0,
            ),
        );
        add(
            &mut r,
            &serde_json::json!({"time": "2026-12-01T13:00:00.000000Z", "event": "deny", "outcome": "denied",
                "pod": {"namespace": "team-a", "name": "stranger", "uid": "u5", "service_account": "other"},
                "reason": "NoBinding<script>"})
            .to_string(),
        );
        let html = r.html("audit.jsonl", "chain intact", true, &["audit.jsonl".into()]);
        let o = &r.objects["secret/<db>"];
        assert_eq!(o.reads, 5);
        let app = o.readers.values().find(|x| x.count == 3).unwrap();
        assert!(
            !app.first_seen && !app.shell && !app.outside,
            "the known app is not flagged"
        );
        assert!(
            o.readers
                .values()
                .any(|x| x.shell && x.first_seen && x.uid0)
        );
        assert!(o.readers.values().any(|x| x.outside));
        assert!(html.contains("secret/&lt;db&gt;") && !html.contains("<db>"));
        assert!(html.contains("NoBinding&lt;script&gt;") && !html.contains("<script"));
        assert!(html.contains("default-src 'none'"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
