//! `keybroker mount`'s config file.
#![no_main]

use std::path::Path;

use keybroker::config::MountConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = MountConfig::parse(&text, Path::new("fuzz.yaml"), Path::new("/nonexistent"));
});
