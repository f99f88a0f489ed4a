//! `keybroker check`: validates bindings and explains what a pod would get.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub bindings: PathBuf,
    #[arg(long, requires_all = ["service_account", "provider"])]
    pub namespace: Option<String>,
    #[arg(long)]
    pub service_account: Option<String>,
    #[arg(long, value_parser = ["local", "azure", "vault"])]
    pub provider: Option<String>,
    #[arg(long)]
    pub object: Vec<String>,
    /// The volume's clientID (Azure).
    #[arg(long)]
    pub client_id: Option<String>,
    /// The volume's tenantID (Azure).
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// The volume's keyvaultName (Azure).
    #[arg(long)]
    pub keyvault: Option<String>,
    /// The volume asks for the node's managed identity (useVMManagedIdentity).
    #[arg(long)]
    pub managed_identity: bool,
    /// The volume's roleName (Vault).
    #[arg(long)]
    pub role: Option<String>,
}

/// `keybroker check`.
pub fn run(args: CheckArgs) -> ExitCode {
    let CheckArgs {
        bindings,
        namespace,
        service_account,
        provider,
        object,
        client_id,
        tenant_id,
        keyvault,
        managed_identity,
        role,
    } = args;
    let ask = keybroker::node::request::IdentityRequest {
        client_id: if managed_identity {
            None
        } else {
            client_id.clone()
        },
        user_assigned_identity_id: if managed_identity { client_id } else { None },
        tenant_id,
        keyvault_name: keyvault,
        use_vm_managed_identity: managed_identity,
        role_name: role,
        ..Default::default()
    };
    check(bindings, namespace, service_account, provider, object, ask)
}

#[allow(clippy::too_many_arguments)]
fn check(
    bindings: PathBuf,
    namespace: Option<String>,
    service_account: Option<String>,
    provider: Option<String>,
    object: Vec<String>,
    ask: keybroker::node::request::IdentityRequest,
) -> ExitCode {
    use keybroker::node::bindings::Bindings;
    use keybroker::node::request::{PodInfo, ProviderKind};
    let b = match Bindings::load(&bindings) {
        Ok(b) => b,
        Err(e) => {
            println!("invalid: {e}");
            return ExitCode::from(1);
        }
    };
    let (Some(ns), Some(sa), Some(p)) = (namespace, service_account, provider) else {
        println!("ok: {} bindings", b.list.len());
        for x in &b.list {
            let sas: Vec<&str> = x.service_accounts.iter().map(String::as_str).collect();
            let objects: Vec<String> = x.objects.iter().map(ToString::to_string).collect();
            println!(
                "  {}: {}/{{{}}} -> {} objects [{}]",
                x.name,
                x.namespace,
                sas.join(","),
                x.identity.key(),
                objects.join(", ")
            );
            println!("    readers: {}", x.readers.explain());
        }
        return ExitCode::SUCCESS;
    };
    let provider = match p.as_str() {
        "azure" => ProviderKind::Azure,
        "vault" => ProviderKind::Vault,
        _ => ProviderKind::Local,
    };
    let pod = PodInfo {
        namespace: ns,
        name: "<any>".into(),
        uid: String::new(),
        service_account: sa,
    };
    match b.decide(&pod, provider, &ask, &object) {
        Ok(g) => {
            println!(
                "allowed: binding {:?} grants {} as {}",
                g.binding,
                object.join(", "),
                g.identity.key()
            );
            println!("readers: {}", g.readers.explain());
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("{why}");
            ExitCode::from(1)
        }
    }
}
