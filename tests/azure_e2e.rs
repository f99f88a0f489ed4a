//! Azure: the Entra ID + Key Vault stand-in, shown faithful with Microsoft's own SDK.

mod common;

use common::azure::*;
use common::peers::peers_python;

/// Microsoft's Python SDK (azure-identity, azure-keyvault-secrets/-certificates/-keys, pinned by
/// scripts/install-peers.sh) gets tokens from the stand-in and reads and writes through it;
/// refusals surface as the SDK's exception types; a 429 is retried after Retry-After. The
/// script prints one line per check.
#[test]
fn microsofts_python_sdk_accepts_the_standin() {
    let tmp = common::open_tempdir();
    let standin = AzureStandin::start(tmp.path(), &[]);
    let out = std::process::Command::new(peers_python())
        .arg(standin_script("azure_conformance.py"))
        .arg(&standin.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}\nstand-in log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        standin.logs()
    );
    assert!(stdout.contains("conformance: Microsoft's Python SDK accepts the stand-in"));
    // Every check of the script ran (a check that stopped early fails above).
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count() >= 30,
        "{stdout}"
    );
}
