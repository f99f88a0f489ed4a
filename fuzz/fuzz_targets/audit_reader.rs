//! `keybroker audit verify` over an arbitrary log and head anchor (an auditor runs it on files
//! anyone with write access could have edited).
#![no_main]

use keybroker::audit::{AuditKey, PublicKey, VerifyOptions, verify_reader};
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
        // Checkpoints and the signed head are parsed and checked too (any key: the
        // signatures fail, the parsing is what is fuzzed).
        public_keys: if mode & 5 == 4 {
            let mut spki = vec![
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ];
            spki.extend_from_slice(&[9u8; 32]);
            PublicKey::from_spki(&spki).into_iter().collect()
        } else {
            Vec::new()
        },
    };
    let _ = verify_reader(log, head.as_deref(), &opts);
});
