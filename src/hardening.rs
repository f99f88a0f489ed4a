//! Process hardening done at start-up, in every mode: secrets must not reach a core dump.
//!
//! - `RLIMIT_CORE` 0 (soft and hard): no core file, and no way for the process to raise it.
//! - `PR_SET_DUMPABLE` 0: no core dump even through a `core_pattern` pipe handler (which
//!   ignores `RLIMIT_CORE`), unless `fs.suid_dumpable` is 2; no ptrace attach by the same uid;
//!   `/proc/<pid>` files owned by root.
//!
//! What this does not do: mark individual buffers `MADV_DONTDUMP` (that needs page-aligned
//! allocations and `unsafe`); with dumps off for the whole process it would add nothing except
//! where `fs.suid_dumpable` is 2, which [`disable_core_dumps`] reports.

/// What [`disable_core_dumps`] could not do, for the caller to log.
#[derive(Debug, Default)]
pub struct Hardening {
    pub warnings: Vec<String>,
}

pub fn disable_core_dumps() -> Hardening {
    use nix::sys::resource::{Resource, setrlimit};
    let mut h = Hardening::default();
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        h.warnings.push(format!(
            "cannot set RLIMIT_CORE to 0: {e}; core files may hold secrets"
        ));
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        h.warnings.push(format!(
            "cannot clear the dumpable flag (PR_SET_DUMPABLE): {e}; core dumps may hold secrets"
        ));
    }
    if std::fs::read_to_string("/proc/sys/fs/suid_dumpable").is_ok_and(|v| v.trim() == "2") {
        h.warnings.push(
            "fs.suid_dumpable is 2: a core_pattern pipe handler can still receive a dump of this process; set it to 0 on nodes that run keybroker".into(),
        );
    }
    h
}
