//! Every configuration example in the docs goes through keybroker's own parsers, so the
//! reference (docs/CONFIG.md) cannot drift from the code. A fenced block whose info string
//! names a format (```yaml keybroker-config, keybroker-bindings, keybroker-volume,
//! keybroker-spc) is parsed as that format; the volume and SecretProviderClass examples must
//! also be granted by the bindings example, as a pod of the namespace they are written for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keybroker::config::MountConfig;
use keybroker::node::bindings::Bindings;
use keybroker::node::request::{self, ProviderKind};
use keybroker::volume::VolumeKind;
use keybroker::volume::content::Limits;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced blocks of `file` whose info string is `yaml <kind>`, with their line numbers.
fn blocks(file: &Path, kind: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None => {
                if line.trim() == format!("```yaml {kind}") {
                    current = Some((i + 1, String::new()));
                }
            }
            Some((_, body)) => {
                if line.trim() == "```" {
                    out.push(current.take().unwrap());
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(current.is_none(), "{}: an unclosed block", file.display());
    out
}

fn docs() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    files
}

fn all(kind: &str) -> Vec<(String, String)> {
    docs()
        .iter()
        .flat_map(|f| {
            blocks(f, kind)
                .into_iter()
                .map(move |(line, b)| (format!("{}:{line}", f.display()), b))
        })
        .collect()
}

/// The Azure workload identity webhook's environment, as a pod under it has it.
fn webhook_env(k: &str) -> Option<String> {
    match k {
        "AZURE_TENANT_ID" => Some("72f988bf-0000-4000-8000-00000000c0de".into()),
        "AZURE_CLIENT_ID" => Some("11111111-2222-4333-8444-555555555555".into()),
        "AZURE_FEDERATED_TOKEN_FILE" => {
            Some("/var/run/secrets/azure/tokens/azure-identity-token".into())
        }
        "AZURE_AUTHORITY_HOST" => Some("https://login.microsoftonline.com/".into()),
        _ => None,
    }
}

#[test]
fn every_volume_config_example_parses() {
    let examples = all("keybroker-config");
    assert!(examples.len() >= 3, "the config reference has examples");
    for (at, text) in &examples {
        let c = MountConfig::parse_env(
            text,
            Path::new("keybroker.yaml"),
            Path::new("/etc/kb"),
            &webhook_env,
        )
        .unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(!c.content.objects().is_empty(), "{at}: no files");
    }
}

fn the_bindings() -> Bindings {
    let examples = all("keybroker-bindings");
    assert!(
        !examples.is_empty(),
        "the bindings reference has an example"
    );
    let mut parsed = examples
        .iter()
        .map(|(at, text)| Bindings::parse(text).unwrap_or_else(|e| panic!("{at}: {e}")));
    parsed.next().unwrap()
}

#[test]
fn every_bindings_example_parses() {
    for (at, text) in all("keybroker-bindings") {
        Bindings::parse(&text).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
}

/// Parses volume attributes as kubelet hands them over for a pod of `ns`/`sa`, and asks the
/// bindings example for a grant.
fn parse_and_authorize(at: &str, attrs: BTreeMap<String, String>, bindings: &Bindings) {
    let mut ctx = attrs;
    let (ns, sa) = match (
        ctx.get("keyvaultName"),
        ctx.get("provider").map(String::as_str),
    ) {
        (Some(_), _) | (_, Some("azure")) => ("team-b", "web"),
        _ => ("team-a", "api"),
    };
    for (k, v) in [
        (request::POD_NAMESPACE, ns),
        (request::POD_NAME, "docs-example"),
        (request::POD_UID, "0b7d6c2e-0000-4000-8000-000000000001"),
        (request::POD_SA, sa),
        (request::EPHEMERAL, "true"),
    ] {
        ctx.insert(k.into(), v.into());
    }
    let vr = request::parse(
        &ctx,
        &Default::default(),
        VolumeKind::Tmpfs,
        Limits::default(),
    )
    .unwrap_or_else(|e| panic!("{at}: {e}"));
    assert!(!vr.content.objects().is_empty(), "{at}: no objects");
    let grant = bindings
        .authorize(&vr)
        .unwrap_or_else(|e| panic!("{at}: the bindings example does not grant it: {e}"));
    assert_eq!(grant.identity.provider(), vr.provider, "{at}");
}

fn string_map(at: &str, v: &serde_norway::Value) -> BTreeMap<String, String> {
    let m = v
        .as_mapping()
        .unwrap_or_else(|| panic!("{at}: not a mapping"));
    m.iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str()
                    .unwrap_or_else(|| {
                        panic!("{at}: {k:?} is not a string (attributes are strings)")
                    })
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_volume_attributes_example_parses_and_is_granted() {
    let bindings = the_bindings();
    let examples = all("keybroker-volume");
    assert!(examples.len() >= 3, "one example per provider");
    let mut providers = std::collections::HashSet::new();
    for (at, text) in &examples {
        let v: serde_norway::Value = serde_norway::from_str(text).unwrap();
        let attrs = string_map(at, &v);
        parse_and_authorize(at, attrs.clone(), &bindings);
        providers.insert(match attrs.get("keyvaultName") {
            Some(_) => ProviderKind::Azure,
            None if attrs.contains_key("roleName") => ProviderKind::Vault,
            None => ProviderKind::Local,
        });
    }
    assert_eq!(providers.len(), 3, "local, Azure and Vault examples");
}

#[test]
fn every_secret_provider_class_example_parses_and_is_granted() {
    let bindings = the_bindings();
    let examples = all("keybroker-spc");
    assert!(!examples.is_empty());
    for (at, text) in &examples {
        let spc: serde_norway::Value = serde_norway::from_str(text).unwrap();
        assert_eq!(spc["kind"].as_str(), Some("SecretProviderClass"), "{at}");
        let params = string_map(at, &spc["spec"]["parameters"]);
        parse_and_authorize(at, params, &bindings);
    }
}
