//! kubelet's `csi.storage.k8s.io/serviceAccount.tokens` JSON and the JWT claims inside it (a
//! pod's token is checked against the pod info before any provider sees it).
#![no_main]

use std::time::{Duration, SystemTime};

use keybroker::node::request::PodInfo;
use keybroker::node::token::{check, claims, parse_tokens};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = claims(&text);
    let pod = PodInfo {
        namespace: "ns".into(),
        name: "p".into(),
        uid: "u".into(),
        service_account: "sa".into(),
    };
    if let Ok(tokens) = parse_tokens(&text) {
        for t in &tokens {
            let _ = check(
                t,
                &pod,
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            );
        }
    }
});
