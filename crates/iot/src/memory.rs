//! AWS IoT in memory (feature `testing`), for unit tests of the decision and the operator's
//! workflows: [`MemoryIot`] keeps AWS IoT's state in maps and answers the way AWS IoT does (not
//! found, idempotent creates, attachments), records every call, and fails chosen calls on
//! request.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::ports::{CaDescription, CaRegistrationMode};
use crate::{
    AwsAnswer, Cause, CertificateDescription, CertificateId, CertificatePage, CertificateStatus,
    IotAdmin, IotRegistry, ListedCertificate, RegistryError, ThingSpec,
};

/// The account and region of the ARNs [`MemoryIot`] makes.
const ARN_PREFIX: &str = "arn:aws:iot:us-east-1:123456789012";

/// A failure [`MemoryIot`] answers with instead of doing a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// ThrottlingException.
    Throttled,
    /// A 5xx or a dropped connection.
    Unavailable,
    /// Any other failure (access denied, say).
    Failed,
}

/// One certificate in [`MemoryIot`].
#[derive(Debug, Clone)]
pub struct MemoryCertificate {
    /// The certificate, PEM.
    pub pem: String,
    /// Its status.
    pub status: CertificateStatus,
    /// The CA it is registered under.
    pub ca: Option<CertificateId>,
    /// When it was registered, epoch seconds.
    pub created: i64,
}

/// One CA in [`MemoryIot`].
#[derive(Debug, Clone)]
struct MemoryCa {
    pem: String,
    status: String,
}

#[derive(Debug, Default)]
struct State {
    certificates: BTreeMap<String, MemoryCertificate>,
    cas: BTreeMap<String, MemoryCa>,
    things: BTreeMap<String, ThingSpec>,
    /// (thing, certificate ARN).
    principals: BTreeSet<(String, String)>,
    /// (policy, certificate ARN).
    policies: BTreeSet<(String, String)>,
    /// Thing name to groups.
    groups: BTreeMap<String, BTreeSet<String>>,
    calls: Vec<&'static str>,
    faults: HashMap<&'static str, VecDeque<Fault>>,
    registration_code: Option<String>,
    /// Changes made just before the n-th call of an operation (an operator, or another
    /// decision, acting while one is under way).
    changes: Vec<(&'static str, usize, Change)>,
}

/// Something another actor does to the registry.
#[derive(Debug, Clone)]
enum Change {
    Status(String, CertificateStatus),
    Attach { thing: String, id: String },
}

/// AWS IoT's control plane in memory. Cheap to clone: clones share the state.
#[derive(Debug, Clone, Default)]
pub struct MemoryIot(Arc<Mutex<State>>);

/// The ARN of a certificate id.
pub fn certificate_arn(id: &str) -> String {
    format!("{ARN_PREFIX}:cert/{id}")
}

fn id_of(arn: &str) -> &str {
    arn.rsplit_once("cert/").map_or(arn, |(_, id)| id)
}

impl MemoryIot {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a CA (ACTIVE) and returns its id (SHA-256 of its DER).
    pub fn add_ca(&self, pem: &str) -> CertificateId {
        let id = id_of_pem(pem);
        self.state().cas.insert(
            id.to_string(),
            MemoryCa {
                pem: pem.to_owned(),
                status: "ACTIVE".to_owned(),
            },
        );
        id
    }

    /// Sets a CA's status (`ACTIVE` or `INACTIVE`).
    pub fn set_ca_status(&self, id: &CertificateId, status: &str) {
        if let Some(ca) = self.state().cas.get_mut(id.as_str()) {
            ca.status = status.to_owned();
        }
    }

    /// Registers a device certificate with `status` under `ca`, as a first connect does;
    /// returns its id.
    pub fn add_certificate(
        &self,
        pem: &str,
        status: CertificateStatus,
        ca: Option<&CertificateId>,
        created: i64,
    ) -> CertificateId {
        let id = id_of_pem(pem);
        self.add_certificate_as(id.as_str(), pem, status, ca, created);
        id
    }

    /// The same under an id of the caller's choosing (as a registry that lies would hold it).
    pub fn add_certificate_as(
        &self,
        id: &str,
        pem: &str,
        status: CertificateStatus,
        ca: Option<&CertificateId>,
        created: i64,
    ) {
        self.state().certificates.insert(
            id.to_owned(),
            MemoryCertificate {
                pem: pem.to_owned(),
                status,
                ca: ca.cloned(),
                created,
            },
        );
    }

    /// A certificate's status.
    pub fn status(&self, id: &str) -> Option<CertificateStatus> {
        self.state().certificates.get(id).map(|c| c.status.clone())
    }

    /// Whether a Thing exists.
    pub fn thing_exists(&self, name: &str) -> bool {
        self.state().things.contains_key(name)
    }

    /// The certificate ids attached to a Thing.
    pub fn principals_of(&self, thing: &str) -> Vec<String> {
        self.state()
            .principals
            .iter()
            .filter(|(t, _)| t == thing)
            .map(|(_, arn)| id_of(arn).to_owned())
            .collect()
    }

    /// The policies attached to a certificate.
    pub fn policies_of(&self, id: &str) -> Vec<String> {
        let arn = certificate_arn(id);
        self.state()
            .policies
            .iter()
            .filter(|(_, a)| *a == arn)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every call made so far, by operation name, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.state().calls.clone()
    }

    /// The calls that change something, in order.
    pub fn writes(&self) -> Vec<&'static str> {
        const WRITES: [&str; 9] = [
            "CreateThing",
            "UpdateThing",
            "AddThingToThingGroup",
            "AttachPolicy",
            "AttachThingPrincipal",
            "UpdateCertificate",
            "DetachPolicy",
            "DetachThingPrincipal",
            "DeleteThing",
        ];
        self.calls()
            .into_iter()
            .filter(|c| WRITES.contains(c))
            .collect()
    }

    /// Forgets the calls made so far.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// Sets certificate `id` to `status` just before the `nth` call of `op` (counted from the
    /// first call ever made), as an operator acting during a decision would.
    pub fn change_status_before(
        &self,
        op: &'static str,
        nth: usize,
        id: &str,
        status: CertificateStatus,
    ) {
        self.state()
            .changes
            .push((op, nth, Change::Status(id.to_owned(), status)));
    }

    /// Attaches certificate `id` to the existing Thing `thing` just before the `nth` call of
    /// `op`, as a racing decision would.
    pub fn attach_before(&self, op: &'static str, nth: usize, thing: &str, id: &str) {
        self.state().changes.push((
            op,
            nth,
            Change::Attach {
                thing: thing.to_owned(),
                id: id.to_owned(),
            },
        ));
    }

    /// Attaches certificate `id` to `thing` (creating the Thing), as an earlier activation
    /// or an operator would have.
    pub fn attach(&self, thing: &str, id: &str) {
        let mut state = self.state();
        state
            .things
            .entry(thing.to_owned())
            .or_insert_with(|| ThingSpec {
                name: thing.to_owned(),
                thing_type: None,
                attributes: Vec::new(),
            });
        state
            .principals
            .insert((thing.to_owned(), certificate_arn(id)));
    }

    /// Makes the next call of `op` fail with `fault` (queued: call again for more).
    pub fn fail_next(&self, op: &'static str, fault: Fault) {
        self.state().faults.entry(op).or_default().push_back(fault);
    }

    /// Records the call and answers a queued fault for it, if any.
    fn enter(&self, op: &'static str) -> Result<MutexGuard<'_, State>, RegistryError> {
        let mut state = self.state();
        state.calls.push(op);
        let nth = state.calls.iter().filter(|c| **c == op).count();
        let due: Vec<Change> = state
            .changes
            .iter()
            .filter(|(o, n, _)| *o == op && *n == nth)
            .map(|(_, _, change)| change.clone())
            .collect();
        for change in due {
            match change {
                Change::Status(id, status) => {
                    if let Some(cert) = state.certificates.get_mut(&id) {
                        cert.status = status;
                    }
                }
                Change::Attach { thing, id } => {
                    state.principals.insert((thing, certificate_arn(&id)));
                }
            }
        }
        let fault = state.faults.get_mut(op).and_then(VecDeque::pop_front);
        // The codes AWS IoT answers with for these classes of failure.
        let source = |code| -> Cause { Box::new(AwsAnswer::new(code, "injected by MemoryIot")) };
        match fault {
            None => Ok(state),
            Some(Fault::Throttled) => Err(RegistryError::Throttled {
                op,
                source: source("ThrottlingException"),
            }),
            Some(Fault::Unavailable) => Err(RegistryError::Unavailable {
                op,
                source: source("ServiceUnavailableException"),
            }),
            Some(Fault::Failed) => Err(RegistryError::Failed {
                op,
                source: source("InvalidRequestException"),
            }),
        }
    }
}

/// What AWS IoT answers for a resource that is not there: ResourceNotFoundException.
fn missing(op: &'static str, reason: impl Into<String>) -> RegistryError {
    RegistryError::NotFound {
        op,
        source: Box::new(AwsAnswer::new("ResourceNotFoundException", &reason.into())),
    }
}

/// The AWS IoT id of a PEM certificate (SHA-256 of the DER), or of the text when it does not
/// parse (hostile tests register junk, too).
fn id_of_pem(pem: &str) -> CertificateId {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .unwrap_or_else(|| pem.as_bytes().to_vec());
    let id = factory_ca::certificate_id(&der);
    // A SHA-256 in lowercase hex is always a valid certificate id.
    CertificateId::parse(&id).unwrap_or_else(|_| unreachable_id())
}

#[allow(clippy::unwrap_used)] // 64 zeros are a valid certificate id.
fn unreachable_id() -> CertificateId {
    CertificateId::parse(&"0".repeat(64)).unwrap()
}

impl IotRegistry for MemoryIot {
    async fn describe_certificate(
        &self,
        id: &CertificateId,
        _deadline: Instant,
    ) -> Result<CertificateDescription, RegistryError> {
        const OP: &str = "DescribeCertificate";
        let state = self.enter(OP)?;
        let cert = state
            .certificates
            .get(id.as_str())
            .ok_or_else(|| missing(OP, "no such certificate"))?;
        Ok(CertificateDescription {
            id: id.clone(),
            arn: certificate_arn(id.as_str()),
            status: cert.status.clone(),
            ca_certificate_id: cert.ca.clone(),
            pem: cert.pem.clone(),
        })
    }

    async fn describe_ca_certificate(
        &self,
        id: &CertificateId,
        _deadline: Instant,
    ) -> Result<CaDescription, RegistryError> {
        const OP: &str = "DescribeCACertificate";
        let state = self.enter(OP)?;
        let ca = state
            .cas
            .get(id.as_str())
            .ok_or_else(|| missing(OP, "no such CA"))?;
        Ok(CaDescription {
            id: id.clone(),
            arn: Some(format!("{ARN_PREFIX}:cacert/{id}")),
            status: Some(ca.status.clone()),
            auto_registration: Some("ENABLE".to_owned()),
            pem: ca.pem.clone(),
        })
    }

    async fn create_thing(
        &self,
        thing: &ThingSpec,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut state = self.enter("CreateThing")?;
        state
            .things
            .entry(thing.name.clone())
            .or_insert_with(|| thing.clone());
        Ok(())
    }

    async fn add_thing_to_group(
        &self,
        thing: &str,
        group: &str,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        const OP: &str = "AddThingToThingGroup";
        let mut state = self.enter(OP)?;
        if !state.things.contains_key(thing) {
            return Err(missing(OP, "no such Thing"));
        }
        state
            .groups
            .entry(thing.to_owned())
            .or_default()
            .insert(group.to_owned());
        Ok(())
    }

    async fn attach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut state = self.enter("AttachPolicy")?;
        state
            .policies
            .insert((policy.to_owned(), certificate_arn.to_owned()));
        Ok(())
    }

    async fn attach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        const OP: &str = "AttachThingPrincipal";
        let mut state = self.enter(OP)?;
        if !state.things.contains_key(thing) {
            return Err(missing(OP, "no such Thing"));
        }
        state
            .principals
            .insert((thing.to_owned(), certificate_arn.to_owned()));
        Ok(())
    }

    async fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertificateStatus,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        const OP: &str = "UpdateCertificate";
        let mut state = self.enter(OP)?;
        let cert = state
            .certificates
            .get_mut(id.as_str())
            .ok_or_else(|| missing(OP, "no such certificate"))?;
        cert.status = status;
        Ok(())
    }

    async fn describe_thing(
        &self,
        thing: &str,
        _deadline: Instant,
    ) -> Result<Option<ThingSpec>, RegistryError> {
        let state = self.enter("DescribeThing")?;
        Ok(state.things.get(thing).cloned())
    }

    async fn update_thing_attributes(
        &self,
        thing: &str,
        attributes: &[(String, Option<String>)],
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        const OP: &str = "UpdateThing";
        let mut state = self.enter(OP)?;
        let Some(spec) = state.things.get_mut(thing) else {
            return Err(missing(OP, format!("no Thing {thing}")));
        };
        for (k, v) in attributes {
            spec.attributes.retain(|(name, _)| name != k);
            if let Some(v) = v {
                spec.attributes.push((k.clone(), v.clone()));
            }
        }
        spec.attributes.sort();
        Ok(())
    }

    async fn thing_principals(
        &self,
        thing: &str,
        _deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        const OP: &str = "ListThingPrincipals";
        let state = self.enter(OP)?;
        if !state.things.contains_key(thing) {
            return Err(missing(OP, "no such Thing"));
        }
        Ok(state
            .principals
            .iter()
            .filter(|(t, _)| t == thing)
            .map(|(_, arn)| arn.clone())
            .collect())
    }

    async fn detach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut state = self.enter("DetachThingPrincipal")?;
        state
            .principals
            .remove(&(thing.to_owned(), certificate_arn.to_owned()));
        Ok(())
    }

    async fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
        newest_first: bool,
        _deadline: Instant,
    ) -> Result<CertificatePage, RegistryError> {
        const PAGE: usize = 250;
        let state = self.enter("ListCertificatesByCA")?;
        let start: usize = marker.and_then(|m| m.parse().ok()).unwrap_or(0);
        let mut all: Vec<_> = state
            .certificates
            .iter()
            .filter(|(_, c)| c.ca.as_ref() == Some(ca))
            .collect();
        all.sort_by_key(|(id, c)| (c.created, (*id).clone()));
        if newest_first {
            all.reverse();
        }
        let certificates = all
            .iter()
            .skip(start)
            .take(PAGE)
            .filter_map(|(id, c)| {
                Some(ListedCertificate {
                    id: CertificateId::parse(id).ok()?,
                    status: c.status.clone(),
                    created: Some(c.created),
                })
            })
            .collect();
        let next = start + PAGE;
        Ok(CertificatePage {
            certificates,
            next_marker: (next < all.len()).then(|| next.to_string()),
        })
    }
}

impl IotAdmin for MemoryIot {
    async fn describe_endpoint(
        &self,
        endpoint_type: &str,
        _deadline: Instant,
    ) -> Result<String, RegistryError> {
        drop(self.enter("DescribeEndpoint")?);
        Ok(format!(
            "memory-{}.iot.us-east-1.amazonaws.com",
            endpoint_type.replace(':', "-").to_ascii_lowercase()
        ))
    }

    async fn registration_code(&self, _deadline: Instant) -> Result<String, RegistryError> {
        let mut state = self.enter("GetRegistrationCode")?;
        Ok(state
            .registration_code
            .get_or_insert_with(|| "0123456789abcdef".repeat(4))
            .clone())
    }

    async fn register_ca_certificate(
        &self,
        ca_pem: &str,
        mode: &CaRegistrationMode,
        _deadline: Instant,
    ) -> Result<(String, Option<String>), RegistryError> {
        const OP: &str = "RegisterCACertificate";
        let mut state = self.enter(OP)?;
        if let CaRegistrationMode::Verified { verification_pem } = mode {
            if factory_ca::certificates_from_pem_or_der(verification_pem.as_bytes()).is_err() {
                return Err(RegistryError::failed(
                    OP,
                    "the verification certificate does not parse",
                ));
            }
        }
        let id = id_of_pem(ca_pem);
        if state.cas.contains_key(id.as_str()) {
            return Err(RegistryError::AlreadyExists {
                op: OP,
                resource_id: Some(id.to_string()),
                source: "the CA is registered".into(),
            });
        }
        state.cas.insert(
            id.to_string(),
            MemoryCa {
                pem: ca_pem.to_owned(),
                status: "ACTIVE".to_owned(),
            },
        );
        Ok((id.to_string(), Some(format!("{ARN_PREFIX}:cacert/{id}"))))
    }

    async fn principal_things(
        &self,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let state = self.enter("ListPrincipalThings")?;
        Ok(state
            .principals
            .iter()
            .filter(|(_, a)| a == certificate_arn)
            .map(|(t, _)| t.clone())
            .collect())
    }

    async fn attached_policies(
        &self,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let state = self.enter("ListAttachedPolicies")?;
        Ok(state
            .policies
            .iter()
            .filter(|(_, a)| a == certificate_arn)
            .map(|(p, _)| p.clone())
            .collect())
    }

    async fn detach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut state = self.enter("DetachPolicy")?;
        state
            .policies
            .remove(&(policy.to_owned(), certificate_arn.to_owned()));
        Ok(())
    }

    async fn delete_thing(&self, thing: &str, _deadline: Instant) -> Result<bool, RegistryError> {
        const OP: &str = "DeleteThing";
        let mut state = self.enter(OP)?;
        if state.principals.iter().any(|(t, _)| t == thing) {
            return Err(RegistryError::failed(
                OP,
                "InvalidRequestException: the Thing still has principals attached",
            ));
        }
        Ok(state.things.remove(thing).is_some())
    }

    async fn list_things(&self, _deadline: Instant) -> Result<Vec<ThingSpec>, RegistryError> {
        let state = self.enter("ListThings")?;
        Ok(state.things.values().cloned().collect())
    }

    async fn register_certificate(
        &self,
        pem: &str,
        ca_pem: &str,
        status: CertificateStatus,
        _deadline: Instant,
    ) -> Result<CertificateId, RegistryError> {
        const OP: &str = "RegisterCertificate";
        let mut state = self.enter(OP)?;
        let id = id_of_pem(pem);
        let ca = id_of_pem(ca_pem);
        if !state.cas.contains_key(ca.as_str()) {
            return Err(RegistryError::failed(OP, "the CA is not registered"));
        }
        let created = state.certificates.len() as i64;
        state
            .certificates
            .entry(id.to_string())
            .or_insert(MemoryCertificate {
                pem: pem.to_owned(),
                status,
                ca: Some(ca),
                created,
            });
        Ok(id)
    }

    async fn set_ca_jitp(
        &self,
        ca: &CertificateId,
        _config: &crate::JitpConfig,
        _deadline: Instant,
    ) -> Result<(), RegistryError> {
        const OP: &str = "UpdateCACertificate";
        let state = self.enter(OP)?;
        if state.cas.contains_key(ca.as_str()) {
            Ok(())
        } else {
            Err(missing(OP, format!("no CA {ca}")))
        }
    }

    async fn create_provisioning_claim(
        &self,
        template: &str,
        _deadline: Instant,
    ) -> Result<crate::ProvisioningClaim, RegistryError> {
        drop(self.enter("CreateProvisioningClaim")?);
        Err(missing(
            "CreateProvisioningClaim",
            format!("no provisioning template {template} in memory"),
        ))
    }
}
