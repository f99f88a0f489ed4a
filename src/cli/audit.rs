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
    /// Check an audit log's chain and head anchor; exit 1 naming the first broken line.
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
        /// The audit log (JSON lines); its `.head` anchor next to it is checked too.
        file: PathBuf,
        /// The chain key (the daemon's --audit-key file); required for a keyed log.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Accept a log whose `.head` anchor is missing (records cut off the end then go
        /// undetected).
        #[arg(long)]
        allow_missing_head: bool,
    },
}

pub fn run(args: AuditArgs) -> ExitCode {
    match args.command {
        AuditCommand::Verify {
            file,
            key,
            allow_missing_head,
        } => {
            let key = match key
                .map(|k| keybroker::audit::AuditKey::load(&k))
                .transpose()
            {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let keyed = key.is_some();
            let opts = keybroker::audit::VerifyOptions {
                key,
                allow_missing_head,
            };
            verify_command(&file, &opts, keyed)
        }
    }
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
            println!("ok: {} records, {chain}{head}", report.records);
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
