//! A NodePublishVolume's volume attributes, as a pod author writes them: the `objects` text in
//! all three dialects (Secrets Store Azure, Secrets Store Vault, keybroker's local), plus the
//! other attributes. Nothing may panic, and the parse must stay bounded (libFuzzer's -timeout
//! and -rss_limit_mb make slow or huge parses findings).
#![no_main]

use std::collections::BTreeMap;

use keybroker::node::request::parse;
use keybroker::volume::VolumeKind;
use keybroker::volume::content::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (objects, other) = text.split_once('\u{0}').unwrap_or((&text, ""));
    let mut ctx: BTreeMap<String, String> = [
        ("csi.storage.k8s.io/pod.name", "p"),
        ("csi.storage.k8s.io/pod.namespace", "ns"),
        ("csi.storage.k8s.io/pod.uid", "u"),
        ("csi.storage.k8s.io/serviceAccount.name", "sa"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let provider = ["local", "vault", "azure"][selector as usize % 3];
    ctx.insert("provider".into(), provider.into());
    ctx.insert("objects".into(), objects.to_owned());
    // Further attributes as `key=value` lines (volumeType, roleName, credentialScope, ...).
    for line in other.lines().take(16) {
        if let Some((k, v)) = line.split_once('=') {
            ctx.insert(k.to_owned(), v.to_owned());
        }
    }
    let kind = if selector & 0x80 == 0 {
        VolumeKind::Fuse
    } else {
        VolumeKind::Tmpfs
    };
    let _ = parse(&ctx, &Default::default(), kind, Limits::default());
});
