//! Mending: the safe fixes planned from the states, and applied.

use super::*;

/// One safe action of `status --fix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fix {
    /// The device.
    pub device_id: String,
    /// What to do.
    pub action: FixAction,
    /// Why.
    pub reason: String,
}

/// What a fix does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FixAction {
    /// Revoke a certificate (REVOKED, policies and Things detached).
    Revoke {
        /// The certificate.
        certificate_id: String,
    },
    /// Delete a Thing with nothing attached.
    DeleteThing {
        /// The Thing.
        thing: String,
    },
    /// Make the device's Thing again and attach the certificate to it.
    Reattach {
        /// The certificate.
        certificate_id: String,
        /// The Thing (the device id).
        thing: String,
    },
}

impl fmt::Display for Fix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            FixAction::Revoke { certificate_id } => write!(
                f,
                "{}: revoke certificate {certificate_id} ({})",
                self.device_id, self.reason
            ),
            FixAction::DeleteThing { thing } => {
                write!(
                    f,
                    "{}: delete Thing {thing} ({})",
                    self.device_id, self.reason
                )
            }
            FixAction::Reattach {
                certificate_id,
                thing,
            } => write!(
                f,
                "{}: attach certificate {certificate_id} to Thing {thing} ({})",
                self.device_id, self.reason
            ),
        }
    }
}

/// The safe fixes for `rows` (every row a device jitr owns): a drifted device's ACTIVE
/// certificates revoked (and its Thing deleted, with `delete_things`); a duplicate's ACTIVE
/// certificates but the newest revoked, only once the newest has connected (proof of use:
/// without it, nothing); an orphan Thing deleted (with `delete_things`); an orphan certificate
/// attached again to its device's Thing when the device is an active member and the certificate
/// is attached nowhere else (revoking it would take the device's only identity), revoked
/// otherwise. An inactive device is never touched. Nothing else is.
pub fn plan_fixes(rows: &[DeviceStatus], delete_things: bool) -> Vec<Fix> {
    let mut fixes = Vec::new();
    for row in rows {
        let active: Vec<&CertificateRow> = row
            .certificates
            .iter()
            .filter(|c| c.status == CertificateStatus::Active.as_str())
            .collect();
        let revoke = |c: &CertificateRow, reason: &str| Fix {
            device_id: row.device_id.clone(),
            action: FixAction::Revoke {
                certificate_id: c.certificate_id.clone(),
            },
            reason: reason.to_owned(),
        };
        match row.state {
            State::Drifted => {
                fixes.extend(
                    active
                        .iter()
                        .map(|c| revoke(c, "not in the fleet, or cut off by jitr revoke")),
                );
                // Its Thing goes too, once nothing live is attached (an orphan otherwise).
                if let (Some(thing), true) = (&row.thing, delete_things) {
                    fixes.push(Fix {
                        device_id: row.device_id.clone(),
                        action: FixAction::DeleteThing {
                            thing: thing.clone(),
                        },
                        reason: "not in the fleet, or cut off by jitr revoke".to_owned(),
                    });
                }
            }
            State::Duplicate if row.newest_connected => {
                // Certificates are listed oldest first: all but the last go.
                let keep = active.len().saturating_sub(1);
                fixes.extend(
                    active[..keep]
                        .iter()
                        .map(|c| revoke(c, "a newer ACTIVE certificate replaces it")),
                );
            }
            State::Orphan => match (&row.thing, active.first()) {
                (Some(thing), None) if delete_things => fixes.push(Fix {
                    device_id: row.device_id.clone(),
                    action: FixAction::DeleteThing {
                        thing: thing.clone(),
                    },
                    reason: "no certificate is attached to it".to_owned(),
                }),
                (None, Some(c)) if row.fleet_member && !row.reason.contains("attached to") => {
                    fixes.push(Fix {
                        device_id: row.device_id.clone(),
                        action: FixAction::Reattach {
                            certificate_id: c.certificate_id.clone(),
                            thing: row.device_id.clone(),
                        },
                        reason: "its Thing is gone: made again and attached".to_owned(),
                    });
                }
                (None, Some(c)) => fixes.push(revoke(c, "ACTIVE without its Thing")),
                _ => {}
            },
            _ => {}
        }
    }
    fixes
}

/// How one fix went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The fix.
    pub fix: Fix,
    /// `None` when done; the error otherwise.
    pub error: Option<String>,
}

/// Applies `fixes` one after the other (each idempotent: a second run finds them done); a
/// Thing made again gets what `ownership` says jitr's Things carry.
pub async fn apply_fixes<A: IotAdmin>(
    iot: &A,
    fixes: &[Fix],
    ownership: &activator::ownership::Ownership,
    deadline: Instant,
) -> Vec<Applied> {
    let mut applied = Vec::new();
    for fix in fixes {
        let result = match &fix.action {
            FixAction::Revoke { certificate_id } => match CertificateId::parse(certificate_id) {
                // The fixes were read off jitr's own certificates and Things.
                Ok(id) => revoke(
                    iot,
                    &Target::Certificate(id),
                    &[],
                    false,
                    &crate::revoke::Scope::vouched(),
                    deadline,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.into_registry("RevokeCertificate")),
                Err(reason) => Err(RegistryError::failed("RevokeCertificate", reason)),
            },
            FixAction::DeleteThing { thing } => delete_thing(iot, thing, deadline).await,
            FixAction::Reattach {
                certificate_id,
                thing,
            } => reattach(iot, certificate_id, thing, ownership, deadline).await,
        };
        applied.push(Applied {
            fix: fix.clone(),
            error: result.err().map(|e| iot::error_chain(&e)),
        });
    }
    applied
}

/// Makes `thing` again and attaches the certificate to it (both idempotent).
async fn reattach<A: IotAdmin>(
    iot: &A,
    certificate_id: &str,
    thing: &str,
    ownership: &activator::ownership::Ownership,
    deadline: Instant,
) -> Result<(), RegistryError> {
    let d = || call_deadline(deadline);
    let id = CertificateId::parse(certificate_id)
        .map_err(|reason| RegistryError::failed("AttachThingPrincipal", reason))?;
    let arn = iot.describe_certificate(&id, d()).await?.arn;
    let spec = iot::ThingSpec {
        name: thing.to_owned(),
        thing_type: ownership.thing_type.clone(),
        attributes: ownership
            .fleet
            .map(activator::ownership::fleet_attribute)
            .into_iter()
            .collect(),
    };
    iot.create_thing(&spec, d()).await?;
    iot.attach_thing_principal(thing, &arn, d()).await
}

/// Deletes a Thing after detaching the certificates still attached to it, none of them ACTIVE
/// (an ACTIVE certificate stops the deletion: that device is not done with its Thing). A
/// principal that is not a certificate stops it too: it is another application's, never
/// detached by jitr.
async fn delete_thing<A: IotAdmin>(
    iot: &A,
    thing: &str,
    deadline: Instant,
) -> Result<(), RegistryError> {
    let d = || call_deadline(deadline);
    if let Some(id) = activator::ownership::active_attached(iot, thing, deadline)
        .await?
        .first()
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("certificate {id} attached to {thing} is ACTIVE: the Thing stays"),
        ));
    }
    let principals = match iot.thing_principals(thing, d()).await {
        Ok(p) => p,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(other) = principals
        .iter()
        .find(|arn| !activator::ownership::is_certificate_arn(arn))
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("{other} is attached to {thing} and is not a certificate: the Thing stays"),
        ));
    }
    if let Some(mark) = iot
        .describe_thing(thing, d())
        .await?
        .as_ref()
        .and_then(|t| activator::ownership::revoked_mark(t).map(str::to_owned))
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("{thing} carries the revocation mark of {mark}: the Thing stays"),
        ));
    }
    for arn in &principals {
        iot.detach_thing_principal(thing, arn, d()).await?;
    }
    iot.delete_thing(thing, d()).await.map(|_| ())
}
