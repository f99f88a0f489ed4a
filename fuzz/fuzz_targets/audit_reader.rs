//! `keybroker audit verify` over an arbitrary log and head anchor (an auditor runs it on files
//! anyone with write access could have edited).
#![no_main]

use keybroker::audit::{AuditKey, VerifyOptions, verify_reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (log, head) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (
            &rest[..i],
            Some(String::from_utf8_lossy(&rest[i + 1..]).into_owned()),
        ),
        None => (rest, None),
    };
    let opts = VerifyOptions {
        key: (mode & 1 == 1).then(|| AuditKey::from_bytes(&[7u8; 32])),
        allow_missing_head: mode & 2 == 2,
    };
    let _ = verify_reader(log, head.as_deref(), &opts);
});
