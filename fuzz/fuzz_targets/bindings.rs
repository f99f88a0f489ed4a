//! The platform team's bindings file (hot-reloaded from a ConfigMap), and decisions over it.
#![no_main]

use keybroker::node::bindings::Bindings;
use keybroker::node::request::{IdentityRequest, PodInfo, ProviderKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(b) = Bindings::parse(&text) {
        let pod = PodInfo {
            namespace: "team-a".into(),
            name: "p".into(),
            uid: "u".into(),
            service_account: "api".into(),
        };
        for provider in [
            ProviderKind::Local,
            ProviderKind::Vault,
            ProviderKind::Azure,
        ] {
            let _ = b.decide(
                &pod,
                provider,
                &IdentityRequest::default(),
                &["secret/data/team-a/db".into(), "db".into()],
            );
        }
    }
});
