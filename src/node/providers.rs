use super::*;

/// The volume's service-account token for `audience` (kubelet's, for this publish or
/// republish). `None` when kubelet sent no tokens at all (a volume taken over after a restart);
/// an error naming the audience when it sent others but not this one.
pub(super) fn pod_jwt(
    grant: &Grant,
    vr: &VolumeRequest,
    audience: &str,
    used_for: &str,
) -> Result<Option<crate::provider::PodJwt>, NodeError> {
    match vr.tokens.iter().find(|t| t.audience == audience) {
        Some(t) => Ok(Some(crate::provider::PodJwt {
            pod: vr.pod.to_string(),
            jwt: t.token.clone(),
            expires: t.expires,
        })),
        None if vr.tokens.is_empty() => Ok(None),
        None => Err(NodeError::FailedPrecondition(format!(
            "{}: kubelet sent no service-account token for audience {audience:?}, which binding {:?} {used_for}: add it to the CSIDriver's tokenRequests",
            vr.pod, grant.binding
        ))),
    }
}

pub(super) fn provider_error(pod: &PodInfo, e: &ProviderError) -> NodeError {
    let msg = format!("{pod}: {e}");
    match e {
        ProviderError::Throttled { .. } | ProviderError::Unavailable { .. } => {
            NodeError::Unavailable(msg)
        }
        ProviderError::PermissionDenied { .. } => NodeError::PermissionDenied(msg),
        ProviderError::NotFound { .. } | ProviderError::Invalid { .. } => {
            NodeError::FailedPrecondition(msg)
        }
    }
}

/// The identity a volume acts as, as caches and logins see it. Vault and Azure federation log
/// in *as the pod's service account*, and the provider may grant two service accounts different
/// things under one binding identity, so their values and tokens are never shared.
pub(super) fn identity_key(grant: &Grant, pod: &PodInfo) -> String {
    match &grant.identity {
        Identity::Local(_) => grant.identity.key(),
        Identity::Vault(_) | Identity::Azure(_) => format!(
            "{} as {}/{}",
            grant.identity.key(),
            pod.namespace,
            pod.service_account
        ),
    }
}

impl NodeService {
    /// The provider a volume uses. For Vault this is the pod identity's shared login, given the
    /// volume's service-account token (`tokens`: kubelet's, for this publish or republish).
    pub(super) fn provider_for(
        &self,
        grant: &Grant,
        vr: &VolumeRequest,
        target: &Path,
    ) -> Result<Arc<dyn Provider>, NodeError> {
        match &grant.identity {
            Identity::Vault(v) => {
                let audience = v.audience();
                let key = identity_key(grant, &vr.pod);
                let mut vaults = lock(&self.vaults);
                let p = match vaults.get(&key) {
                    Some(p) => p.clone(),
                    None => {
                        let ca_pem = match &v.ca_file {
                            None => None,
                            Some(f) => Some(std::fs::read(f).map_err(|e| {
                                NodeError::FailedPrecondition(format!(
                                    "binding {:?}: cannot read the Vault CA file {}: {e}",
                                    grant.binding,
                                    f.display()
                                ))
                            })?),
                        };
                        let endpoint = vault::Endpoint {
                            address: v.address.clone(),
                            namespace: v.namespace.clone(),
                            ca_pem,
                            tls_server_name: v.tls_server_name.clone(),
                            timeout: Duration::from_secs(15),
                        };
                        let login = vault::LoginConfig {
                            auth_mount: v.auth_mount.clone(),
                            role: v.role.clone(),
                            identity: key.clone(),
                        };
                        let p = VaultProvider::new(&endpoint, login).map_err(|e| {
                            NodeError::FailedPrecondition(format!(
                                "binding {:?}: {e}",
                                grant.binding
                            ))
                        })?;
                        vaults.insert(key.clone(), p.clone());
                        p
                    }
                };
                if let Some(jwt) = pod_jwt(grant, vr, audience, "logs in to Vault with")? {
                    p.set_jwt(&target.to_string_lossy(), jwt);
                }
                Ok(p)
            }
            Identity::Local(l) => {
                let mut locals = lock(&self.locals);
                if let Some(p) = locals.get(&l.path) {
                    return Ok(p.clone());
                }
                let p = Arc::new(
                    LocalProvider::open(&l.path, self.cfg.limits.max_object_bytes).map_err(
                        |e| {
                            NodeError::FailedPrecondition(format!(
                                "binding {:?}: {e}",
                                grant.binding
                            ))
                        },
                    )?,
                );
                locals.insert(l.path.clone(), p.clone());
                Ok(p)
            }
            Identity::Azure(a) => self.azure_provider(grant, a, vr, target),
        }
    }

    /// The Azure provider of a pod identity, given the volume's service-account token for
    /// workload identity federation (publish and every republish).
    pub(super) fn azure_provider(
        &self,
        grant: &Grant,
        a: &bindings::AzureIdentity,
        vr: &VolumeRequest,
        target: &Path,
    ) -> Result<Arc<dyn Provider>, NodeError> {
        let key = identity_key(grant, &vr.pod);
        let refuse = |what: String| {
            NodeError::FailedPrecondition(format!("binding {:?}: {what}", grant.binding))
        };
        let p = {
            let mut azures = lock(&self.azures);
            match azures.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let ca = match &a.ca_file {
                        None => None,
                        Some(f) => Some(std::fs::read(f).map_err(|e| {
                            refuse(format!(
                                "cannot read the Azure CA file {}: {e}",
                                f.display()
                            ))
                        })?),
                    };
                    let http = crate::tls::azure_client(ca.as_deref()).map_err(refuse)?;
                    let tokens = match &a.managed_identity {
                        None => azure::TokenSource::new(
                            azure::Source::Federated {
                                authority: a.authority_host().to_owned(),
                                tenant: a.tenant_id.clone(),
                                client_id: a.client_id.clone(),
                                jwts: Mutex::new(Default::default()),
                            },
                            http.clone(),
                            key.clone(),
                        ),
                        Some(mi) => lock(&self.managed_tokens)
                            .entry(grant.identity.key())
                            .or_insert_with(|| {
                                azure::TokenSource::new(
                                    azure::Source::Managed {
                                        client_id: mi.client_id.clone(),
                                        endpoint: self.cfg.azure_managed.clone(),
                                    },
                                    http.clone(),
                                    grant.identity.key(),
                                )
                            })
                            .clone(),
                    };
                    let suffix = a.keyvault_dns_suffix().to_owned();
                    let access = azure::VaultAccess {
                        verify_challenge_resource: bindings::AZURE_CLOUD_KEYVAULT_SUFFIXES
                            .contains(&suffix.as_str()),
                        dns_suffix: suffix,
                    };
                    let p = AzureProvider::new(tokens, http, access);
                    azures.insert(key.clone(), p.clone());
                    p
                }
            }
        };
        if a.managed_identity.is_none()
            && let Some(jwt) = pod_jwt(grant, vr, a.audience(), "exchanges at Entra ID")?
        {
            p.tokens().set_jwt(&target.to_string_lossy(), jwt);
        }
        Ok(p)
    }
}
