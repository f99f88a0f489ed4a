//! What Entra ID, IMDS / App Service and Key Vault answer, as far as keybroker parses it itself
//! (token replies, Entra error JSON, Key Vault error bodies): the peer is trusted for tokens and
//! values, not for shapes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keybroker::provider::azure::fuzzing::token_reply(data);
    keybroker::provider::azure::fuzzing::error_body(data);
});
