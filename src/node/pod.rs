//! The pod a request is for, as kubelet attests it: what bindings, tokens, audit records and
//! logs name.

use serde::Deserialize;

/// The pod, as kubelet attests it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl PodInfo {
    pub fn audit_ref(&self) -> crate::audit::PodRef {
        crate::audit::PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

impl std::fmt::Display for PodInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} (service account {})",
            self.namespace, self.name, self.service_account
        )
    }
}
