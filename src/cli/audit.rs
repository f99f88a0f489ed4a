//! `keybroker audit`: tools for audit logs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's chain across its segments and its head anchor; exit 1 naming the
    /// first broken record with its segment.
    ///
    /// FILE is the active log (`audit.jsonl`; its sealed segments `audit.jsonl.<N>` beside it
    /// are read first, oldest first) or a directory (every log in it). Records that retention
    /// deleted are told apart from deleted ones by the `prune` record that names them.
    ///
    /// Without --key, anyone who can rewrite the whole log and its anchor can forge a
    /// consistent one; with the key the log was written with, that needs the key.
    ///
    /// On a log that is being written, the anchor trails the last record by up to 200 ms: a
    /// keyed log still verifies (the records after the anchor carry MACs), an unkeyed one
    /// reports them as records after the anchor, and a record being written at that moment
    /// shows as a cut-off last line. Verify a log whose writer has stopped (or a copy of the
    /// log taken after its anchor), or key the log.
    Verify {
        /// The audit log (JSON lines) or a directory of logs; the `.head` anchor next to each
        /// is checked too.
        file: PathBuf,
        /// The chain key (the daemon's --audit-key file); required for a keyed log.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Accept a log whose `.head` anchor is missing (records cut off the end then go
        /// undetected).
        #[arg(long)]
        allow_missing_head: bool,
        /// Verify the signed checkpoints and head anchor of a log written with
        /// --audit-signing-key, with its Ed25519 public key (PEM, `openssl pkey -pubout`).
        /// Repeat it for every key in use across a key rotation. No secret is needed, and
        /// none of these keys can forge a log.
        #[arg(long, value_name = "FILE", conflicts_with = "key")]
        public_key: Vec<PathBuf>,
    },
    /// Print the records that match every filter given, oldest first, from a log and its
    /// segments (or every log in a directory), checking the chain of what it reads: the last
    /// line (on standard error) says whether that part verified; exit 1 if it did not.
    ///
    /// Example: who read the production database password last week, and was any of them not
    /// the application?
    ///
    ///   keybroker audit query /var/log/keybroker --since 7d --object 'secret/prod-db*' --event read
    ///   keybroker audit query /var/log/keybroker --since 7d --object 'secret/prod-db*' --outside-pod
    Query(Box<QueryArgs>),
    /// Write one self-contained HTML page for a time range (no script, font or request):
    /// the verification of every segment and checkpoint at the top; per secret, which pods,
    /// containers and executables read it and when (a timeline), with readers flagged
    /// (first seen, interactive shells, outside the pod's containers, uid 0); denials with
    /// their reasons; gaps; rotations. Aggregated: a month of a busy node stays one page.
    Report {
        /// The audit log (its sealed segments too) or a directory of logs (one report).
        file: PathBuf,
        /// From this time: RFC 3339 or a span ago (default: 30d).
        #[arg(long, default_value = "30d")]
        since: String,
        /// Up to this time (default: now).
        #[arg(long)]
        until: Option<String>,
        /// Where the page goes (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// The chain key of a keyed log.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The public key(s) of a signed log.
        #[arg(long, value_name = "FILE", conflicts_with = "key")]
        public_key: Vec<PathBuf>,
        /// Accept a log whose `.head` anchor is missing.
        #[arg(long)]
        allow_missing_head: bool,
    },
}

#[derive(clap::Args)]
pub struct QueryArgs {
    /// The audit log (its sealed segments are read too) or a directory of logs.
    file: PathBuf,
    /// From this time: RFC 3339 (2026-12-01T00:00:00Z) or a span ago (24h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (same forms).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    /// The pod's name.
    #[arg(long)]
    pod: Option<String>,
    #[arg(long)]
    service_account: Option<String>,
    /// The object (a Vault path, a Key Vault object); a trailing `*` matches a prefix.
    #[arg(long)]
    object: Option<String>,
    /// The file in the volume.
    #[arg(long)]
    file_name: Option<String>,
    /// mount, unmount, fetch, renew, rotate, deny, read, error, gap, seal, prune, checkpoint.
    #[arg(long)]
    event: Option<String>,
    /// success, failure, denied, stale.
    #[arg(long)]
    outcome: Option<String>,
    /// The reading process's command name (e.g. cat, sh).
    #[arg(long)]
    process: Option<String>,
    /// The reading process's executable (e.g. /usr/bin/cat).
    #[arg(long)]
    exe: Option<String>,
    /// The reading container's id (or its first characters).
    #[arg(long)]
    container: Option<String>,
    /// Only reads by processes outside the volume's pod (another pod, or none: the node).
    #[arg(long)]
    outside_pod: bool,
    /// `table` for people, `json` (the records as they are, one per line) for tools.
    #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
    format: QueryFormat,
    /// The chain key of a keyed log.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The public key(s) of a signed log: its checkpoints are verified too.
    #[arg(long, value_name = "FILE", conflicts_with = "key")]
    public_key: Vec<PathBuf>,
    /// Accept a log whose `.head` anchor is missing.
    #[arg(long)]
    allow_missing_head: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueryFormat {
    Table,
    Json,
}

pub fn run(args: AuditArgs) -> ExitCode {
    match args.command {
        AuditCommand::Query(q) => query_command(*q),
        AuditCommand::Report {
            file,
            since,
            until,
            out,
            key,
            public_key,
            allow_missing_head,
        } => match verify_options(key, &public_key, allow_missing_head) {
            Ok(opts) => report_command(&file, &since, until.as_deref(), out.as_deref(), &opts),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        AuditCommand::Verify {
            file,
            key,
            allow_missing_head,
            public_key,
        } => {
            let keyed = key.is_some();
            let opts = match verify_options(key, &public_key, allow_missing_head) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let logs = match logs_in(&file) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut worst = ExitCode::SUCCESS;
            for log in &logs {
                if logs.len() > 1 {
                    print!("{}: ", log.display());
                }
                let code = verify_command(log, &opts, keyed);
                if code != ExitCode::SUCCESS {
                    worst = code;
                }
            }
            worst
        }
    }
}

/// The logs to verify: `path` itself, or every log in a directory (each `X.jsonl`, or the
/// `X.jsonl` whose sealed segments are there when the active file is not).
fn logs_in(path: &std::path::Path) -> Result<Vec<PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut logs = std::collections::BTreeSet::new();
    let entries =
        std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let base = match name.rsplit_once('.') {
            Some((base, n)) if n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => name.as_str(),
        };
        if base.ends_with(".jsonl") {
            logs.insert(path.join(base));
        }
    }
    if logs.is_empty() {
        return Err(format!(
            "no audit log (*.jsonl) in {}: name the log file",
            path.display()
        ));
    }
    Ok(logs.into_iter().collect())
}

fn verify_command(
    file: &std::path::Path,
    opts: &keybroker::audit::VerifyOptions,
    keyed: bool,
) -> ExitCode {
    match keybroker::audit::verify(file, opts) {
        Ok(Ok(report)) => {
            let chain = if keyed {
                "HMAC chain intact"
            } else {
                "chain intact"
            };
            let head = if !report.anchored {
                " (no head anchor: records cut off the end would go unnoticed)".to_string()
            } else if report.beyond_head > 0 {
                format!(
                    ", head anchor matches; {} records after it (MAC-protected)",
                    report.beyond_head
                )
            } else {
                ", head anchor matches".to_string()
            };
            let segments = if report.segments > 1 {
                format!(" in {} segments", report.segments)
            } else {
                String::new()
            };
            let pruned = report
                .pruned_through
                .map(|n| {
                    format!(" (records 0 to {n} deleted by retention, as its prune record says)")
                })
                .unwrap_or_default();
            let signed = if opts.public_keys.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} signed checkpoints verified ({} records after the last one, covered by the signed head anchor)",
                    report.checkpoints, report.after_last_checkpoint
                )
            };
            println!(
                "ok: {} records{segments}{pruned}, {chain}{head}{signed}",
                report.records
            );
            ExitCode::SUCCESS
        }
        Ok(Err(brk)) => {
            println!("broken: {brk}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Keys for verification: the chain key or the public keys.
fn verify_options(
    key: Option<PathBuf>,
    public_key: &[PathBuf],
    allow_missing_head: bool,
) -> Result<keybroker::audit::VerifyOptions, String> {
    let key = key
        .map(|k| keybroker::audit::AuditKey::load(&k))
        .transpose()
        .map_err(|e| e.to_string())?;
    let public_keys = public_key
        .iter()
        .map(|p| keybroker::audit::PublicKey::load(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(keybroker::audit::VerifyOptions {
        key,
        allow_missing_head,
        public_keys,
    })
}

/// `--since`/`--until`: RFC 3339, or a span before now; as the records write times.
fn parse_time(s: &str) -> Result<String, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_duration(s).map(|d| std::time::SystemTime::now() - d))
        .map_err(|_| {
            format!("{s:?} is neither a time (2026-12-01T00:00:00Z) nor a span ago (24h, 7d)")
        })?;
    Ok(humantime::format_rfc3339_micros(t).to_string())
}

fn query_command(q: QueryArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let opts = match verify_options(q.key, &q.public_key, q.allow_missing_head) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let (since, until) = match (
        q.since.as_deref().map(parse_time).transpose(),
        q.until.as_deref().map(parse_time).transpose(),
    ) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let filter = keybroker::audit::Filter {
        since,
        until,
        namespace: q.namespace,
        pod: q.pod,
        service_account: q.service_account,
        object: q.object,
        file: q.file_name,
        event: q.event,
        outcome: q.outcome,
        process: q.process,
        exe: q.exe,
        container: q.container,
        outside_pod: q.outside_pod,
    };
    let logs = match logs_in(&q.file) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    if q.format == QueryFormat::Table {
        let _ = writeln!(
            w,
            "{:<20} {:<10} {:<8} {:<28} {:<30} {:<28} EXECUTABLE",
            "TIME (UTC)", "EVENT", "OUTCOME", "POD", "OBJECT / FILE", "PROCESS"
        );
    }
    let mut code = ExitCode::SUCCESS;
    for log in &logs {
        let mut print = |r: &keybroker::audit::view::RecordView<'_>, line: &[u8]| {
            let _ = match q.format {
                // The record as written (what tools and the schema know).
                QueryFormat::Json => w.write_all(line).and_then(|_| w.write_all(b"\n")),
                QueryFormat::Table => writeln!(w, "{}", table_row(r)),
            };
        };
        let report = match keybroker::audit::query(log, &opts, &filter, 0, &mut print) {
            Ok(r) => r,
            Err(e) => return fail(e.to_string()),
        };
        let _ = w.flush();
        let skipped = if report.segments_skipped > 0 {
            format!(
                ", {} older segments skipped (their chain not checked)",
                report.segments_skipped
            )
        } else {
            String::new()
        };
        let what = format!(
            "{}: {} of {} records matched in {} segments{skipped}",
            log.display(),
            report.matched,
            report.read,
            report.segments_read
        );
        match report.verified {
            Ok(Some(_)) => {
                eprintln!("{what}; verified: chain intact to the end, head anchor matches")
            }
            Ok(None) => eprintln!(
                "{what}; verified: chain intact up to the last record read (read stopped after --until)"
            ),
            Err(b) => {
                eprintln!("{what}; NOT VERIFIED: {b} (nothing after it was read)");
                code = ExitCode::from(1);
            }
        }
    }
    code
}

/// One record as a table row: time to the second, who and what.
fn table_row(r: &keybroker::audit::view::RecordView<'_>) -> String {
    use keybroker::audit::view::t;
    let time = r.time();
    let time = time.get(..19).unwrap_or(time).replace('T', " ");
    let pod = match r.pod_name() {
        "" => t(&r.volume).to_owned(),
        name => format!("{}/{name}", r.namespace()),
    };
    let what = match (t(&r.object), t(&r.file)) {
        (o, f) if !o.is_empty() && !f.is_empty() => format!("{o} ({f})"),
        (o, f) => format!("{o}{f}"),
    };
    let process = if r.process.is_some() {
        let count = r.count.map(|c| format!(" x{c}")).unwrap_or_default();
        format!(
            "{}[{}] uid {}{count}",
            r.comm(),
            r.reader_pid().unwrap_or(0),
            r.reader_uid()
                .map(|u| u.to_string())
                .unwrap_or_else(|| "?".into())
        )
    } else {
        t(&r.detail).chars().take(28).collect()
    };
    // Names come from pods and processes: control and bidi characters never reach the
    // terminal (nor from a forged log's other fields).
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if keybroker::audit::view::hides_text(c) {
                    '\u{fffd}'
                } else {
                    c
                }
            })
            .collect()
    };
    format!(
        "{:<20} {:<10} {:<8} {:<28} {:<30} {:<28} {}",
        clean(&time),
        clean(r.event()),
        clean(t(&r.outcome)),
        clean(&pod),
        clean(&what),
        clean(&process),
        clean(r.exe())
    )
}

fn report_command(
    file: &std::path::Path,
    since: &str,
    until: Option<&str>,
    out: Option<&std::path::Path>,
    opts: &keybroker::audit::VerifyOptions,
) -> ExitCode {
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let since = match parse_time(since) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let until = match until.map(parse_time).transpose() {
        Ok(t) => t.unwrap_or_else(|| {
            humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
        }),
        Err(e) => return fail(e),
    };
    let logs = match logs_in(file) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let mut report = keybroker::audit::Report::new(&since, &until);
    let mut verdicts = Vec::new();
    let mut segments = Vec::new();
    let mut all_ok = true;
    for log in &logs {
        // One pass reads every record for the report and verifies the chain; when it stops
        // before the end (an --until in the past), the whole log is verified apart.
        let filter = keybroker::audit::Filter {
            until: Some(until.clone()),
            ..Default::default()
        };
        let q = match keybroker::audit::query(log, opts, &filter, 1, &mut |r, _| report.add(r)) {
            Ok(q) => q,
            Err(e) => return fail(e.to_string()),
        };
        let verified = match q.verified {
            Ok(Some(r)) => Ok(r),
            Err(b) => Err(b),
            Ok(None) => match keybroker::audit::verify(log, opts) {
                Ok(v) => v,
                Err(e) => return fail(e.to_string()),
            },
        };
        let (ok, verdict) = match verified {
            Ok(r) => (
                true,
                format!(
                    "{}: chain intact across {} segments, {} records{}{}",
                    log.display(),
                    r.segments,
                    r.records,
                    r.pruned_through
                        .map(|n| format!(" (records 0 to {n} pruned by retention)"))
                        .unwrap_or_default(),
                    if opts.public_keys.is_empty() {
                        String::new()
                    } else {
                        format!(", {} signed checkpoints verified", r.checkpoints)
                    }
                ),
            ),
            Err(b) => (false, format!("{}: NOT VERIFIED: {b}", log.display())),
        };
        all_ok &= ok;
        verdicts.push(verdict);
        for s in keybroker::audit::sealed_segments(log).unwrap_or_default() {
            segments.push(format!(
                "{} (sealed; records from {}, {} bytes)",
                s.path.display(),
                s.first_seq,
                std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0)
            ));
        }
        segments.push(format!("{} (active)", log.display()));
    }
    let name = file.display().to_string();
    let html = report.html(&name, &verdicts.join("; "), all_ok, &segments);
    let written = match out {
        Some(p) => std::fs::write(p, html.as_bytes()),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(html.as_bytes())
        }
    };
    if let Err(e) = written {
        return fail(format!("cannot write the report: {e}"));
    }
    if let Some(p) = out {
        eprintln!(
            "{}: {} bytes; {}",
            p.display(),
            html.len(),
            verdicts.join("; ")
        );
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
