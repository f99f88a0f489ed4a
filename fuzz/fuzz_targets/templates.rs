//! Templates (pod input) rendered over object values (provider input), with the size limits
//! enforced while rendering: libFuzzer's -rss_limit_mb makes any amplification a finding.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use keybroker::provider::ObjectRequest;
use keybroker::secret::{SecretBytes, SecretObject};
use keybroker::volume::content::{FileName, FileSource, FileSpec, Limits, Template, VolumeContent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (template, value) = text.split_once('\u{0}').unwrap_or((&text, "{}"));
    let Ok(t) = Template::parse(template) else {
        return;
    };
    // Small limits so that amplification past them is cheap to find.
    let limits = Limits {
        max_files: 4,
        max_object_bytes: 64 << 10,
        max_volume_bytes: 128 << 10,
    };
    let files: Vec<FileSpec> = (0..4)
        .map(|i| FileSpec {
            name: FileName::parse(&format!("f{i}")).unwrap(),
            object: "o".into(),
            version: None,
            params: None,
            mode: 0o440,
            source: FileSource::Template(t.clone()),
        })
        .collect();
    let Ok(content) = VolumeContent::new(files, limits) else {
        return;
    };
    let mut objects = BTreeMap::new();
    objects.insert(
        ObjectRequest {
            name: "o".into(),
            version: None,
            params: None,
        },
        Arc::new(SecretObject {
            value: SecretBytes::new(value.as_bytes().to_vec()),
            version: "1".into(),
            content_type: None,
            expiry: None,
            lease: None,
        }),
    );
    if let Ok(files) = content.render(&objects) {
        let total: usize = files.iter().map(|f| f.bytes.expose().len()).sum();
        assert!(total <= limits.max_volume_bytes);
        assert!(
            files
                .iter()
                .all(|f| f.bytes.expose().len() <= limits.max_object_bytes)
        );
    }
});
