//! Vault's JSON replies (reads of KV v1/v2 and other engines, logins, lease renewals, errors):
//! a Vault server, or whatever answers at its address, is trusted for values, not for shapes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&engine, body)) = data.split_first() else {
        return;
    };
    keybroker::provider::vault::fuzzing::read_reply(engine, body);
});
