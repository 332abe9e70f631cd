//! The pinned fleet: membership, device lookups and key visibility.

use std::fmt;

use factory_ca::DeviceId;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::odata_string;
use crate::{Client, Error};

/// A numeric balena fleet (application) id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FleetId(u64);

impl FleetId {
    /// Validates a fleet id: a positive integer.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        const REASON: &str = "a fleet id is a positive integer (the numeric application id)";
        if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(REASON);
        }
        match s.parse::<u64>() {
            Ok(0) | Err(_) => Err(REASON),
            Ok(n) => Ok(FleetId(n)),
        }
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FleetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A device of the pinned fleet, as balena knows it: the handle every write takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// balena's numeric device id.
    pub id: u64,
    /// The device UUID.
    pub uuid: DeviceId,
    /// Whether the device is active.
    pub is_active: bool,
}

/// Whether a device belongs to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetMembership {
    /// In the fleet and active.
    Member(Device),
    /// In the fleet but deactivated.
    Inactive(Device),
    /// Not in the fleet: proven, since the key was shown right then to see the fleet.
    NotMember,
}

/// The fleet every lookup and write is pinned to.
#[derive(Debug, Clone)]
pub struct Fleet {
    client: Client,
    id: FleetId,
}

/// A navigation property as pinejs answers it when not expanded: `{"__id": N}`.
#[derive(Debug, Deserialize)]
struct Reference {
    #[serde(rename = "__id")]
    id: u64,
}

#[derive(Debug, Deserialize)]
struct DeviceRow {
    id: u64,
    uuid: String,
    is_active: bool,
    #[serde(rename = "belongs_to__application")]
    fleet: Reference,
}

#[derive(Debug, Deserialize)]
struct ApplicationRow {
    id: u64,
}

impl Fleet {
    /// The fleet `id` as seen through `client`.
    pub fn new(client: Client, id: FleetId) -> Self {
        Fleet { client, id }
    }

    /// The fleet id.
    pub fn id(&self) -> FleetId {
        self.id
    }

    /// The client (for its URL in messages).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The device with this UUID in the fleet, if the key can see it there. Every row must
    /// carry the pinned fleet: the answer is checked, not only the filter.
    pub async fn device(
        &self,
        uuid: &DeviceId,
        deadline: Instant,
    ) -> Result<Option<Device>, Error> {
        let path = format!(
            "/v7/device?$select=id,uuid,is_active,belongs_to__application&$filter=uuid%20eq%20{}%20and%20belongs_to__application%20eq%20{}",
            odata_string(uuid.as_str()),
            self.id
        );
        let rows: Vec<DeviceRow> = self.client.get_rows(&path, deadline).await?;
        for row in &rows {
            if row.fleet.id != self.id.get() {
                return Err(Error::WrongFleet {
                    fleet: self.id.get(),
                    found: row.fleet.id,
                });
            }
            if row.uuid != uuid.as_str() {
                return Err(Error::Unparsable(
                    "the answer names another device than the one asked for".into(),
                ));
            }
        }
        match rows.as_slice() {
            [] => Ok(None),
            [row] => Ok(Some(Device {
                id: row.id,
                uuid: uuid.clone(),
                is_active: row.is_active,
            })),
            rows => Err(Error::Ambiguous { rows: rows.len() }),
        }
    }

    /// Every device of the fleet, `PAGE` at a time in id order, each page starting after the
    /// last id seen (keyset paging: a device added or deleted meanwhile shifts nothing), each
    /// row checked to carry the pinned fleet; `progress` hears how many so far. The key must
    /// see the fleet (an empty fleet is proven, not assumed).
    pub async fn devices(
        &self,
        deadline: Instant,
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Vec<Device>, Error> {
        /// Rows per page: about 20 KiB of answer, well under the client's body cap.
        const PAGE: usize = 200;
        self.check_visible(deadline).await?;
        let mut devices = Vec::new();
        let mut after = 0u64;
        loop {
            let path = format!(
                "/v7/device?$select=id,uuid,is_active,belongs_to__application&$filter=belongs_to__application%20eq%20{}%20and%20id%20gt%20{after}&$orderby=id%20asc&$top={PAGE}",
                self.id,
            );
            let rows: Vec<DeviceRow> = self.client.get_rows(&path, deadline).await?;
            let count = rows.len();
            for row in rows {
                if row.fleet.id != self.id.get() {
                    return Err(Error::WrongFleet {
                        fleet: self.id.get(),
                        found: row.fleet.id,
                    });
                }
                if row.id <= after {
                    return Err(Error::Unparsable(
                        "the device pages are not in id order".into(),
                    ));
                }
                after = row.id;
                // A UUID balena holds that is no device id is skipped, not fatal.
                if let Ok(uuid) = DeviceId::parse(&row.uuid, factory_ca::IdFormat::Any) {
                    devices.push(Device {
                        id: row.id,
                        uuid,
                        is_active: row.is_active,
                    });
                }
            }
            progress(devices.len());
            if count < PAGE {
                return Ok(devices);
            }
        }
    }

    /// Whether `uuid` is an active member. An empty answer is "not a member" only once the
    /// key is shown, right then, to still see the fleet: balena answers an empty list both
    /// for a stranger and for a device the key cannot see.
    pub async fn membership(
        &self,
        uuid: &DeviceId,
        deadline: Instant,
    ) -> Result<FleetMembership, Error> {
        match self.device(uuid, deadline).await? {
            Some(device) if device.is_active => Ok(FleetMembership::Member(device)),
            Some(device) => Ok(FleetMembership::Inactive(device)),
            None => {
                self.check_visible(deadline).await?;
                Ok(FleetMembership::NotMember)
            }
        }
    }

    /// Proves the key can see the fleet, or fails with [`Error::FleetNotVisible`].
    pub async fn check_visible(&self, deadline: Instant) -> Result<(), Error> {
        let path = format!("/v7/application({})?$select=id", self.id);
        let rows: Vec<ApplicationRow> = self.client.get_rows(&path, deadline).await?;
        if rows.iter().any(|row| row.id == self.id.get()) {
            Ok(())
        } else {
            Err(Error::FleetNotVisible {
                fleet: self.id.get(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_ids_are_positive_integers() {
        assert_eq!(FleetId::parse("1234567").unwrap().get(), 1234567);
        for bad in ["0", "-1", "12a", "", "1234567890123", "my-fleet"] {
            assert!(FleetId::parse(bad).is_err(), "{bad}");
        }
    }
}
