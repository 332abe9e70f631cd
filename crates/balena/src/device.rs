//! Writes to a device of the pinned fleet: environment variables (device-wide, or of one
//! service on it) and tags, set by POST and, when balena answers 409 (the name exists), by
//! PATCHing the existing row; and removed by DELETE, which balena answers alike whether or not
//! anything was there (so a removal is idempotent).

use reqwest::{Method, StatusCode};
use tokio::time::Instant;

use crate::client::odata_string;
use crate::{Device, Error, Fleet};

/// Where a variable is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A device environment variable: every service on the device sees it.
    Device,
    /// A device service variable: only this service (by name) on the device sees it.
    Service(String),
}

/// What a device carries that jitr writes: environment variables or tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// `device_environment_variable` (`device`, `name`, `value`).
    EnvVar,
    /// `device_service_environment_variable` (`service_install`, `name`, `value`).
    ServiceVar,
    /// `device_tag` (`device`, `tag_key`, `value`): shown in the balena dashboard.
    Tag,
    /// `application_environment_variable` (`application`, `name`, `value`): every device of
    /// the fleet sees it.
    FleetVar,
}

impl Field {
    fn resource(self) -> &'static str {
        match self {
            Field::EnvVar => "device_environment_variable",
            Field::ServiceVar => "device_service_environment_variable",
            Field::Tag => "device_tag",
            Field::FleetVar => "application_environment_variable",
        }
    }

    fn key_field(self) -> &'static str {
        match self {
            Field::EnvVar | Field::ServiceVar | Field::FleetVar => "name",
            Field::Tag => "tag_key",
        }
    }

    fn owner_field(self) -> &'static str {
        match self {
            Field::ServiceVar => "service_install",
            Field::FleetVar => "application",
            Field::EnvVar | Field::Tag => "device",
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct IdRow {
    id: u64,
}

/// What a set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// The variable did not exist and was created (HTTP 201).
    Created,
    /// It existed (HTTP 409 on create) and its value was replaced.
    Updated,
}

impl Fleet {
    /// Sets the environment variable `name` to `value` on `device`, in `scope`.
    pub async fn set_env_var(
        &self,
        device: &Device,
        scope: &Scope,
        name: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        let written = match scope {
            Scope::Device => {
                self.upsert(Field::EnvVar, device.id, name, value, deadline)
                    .await
            }
            Scope::Service(service) => {
                let install = self.service_install(device, service, deadline).await?;
                self.upsert(Field::ServiceVar, install, name, value, deadline)
                    .await
            }
        };
        self.unless_gone(device, written, deadline).await
    }

    /// A write to `device` that balena answered 401: the same answer it gives for a device
    /// that no longer exists (the row the write points to is gone) as for a refused key. A
    /// lookup of the device with the same key tells which; anything else is passed on.
    async fn unless_gone<T>(
        &self,
        device: &Device,
        written: Result<T, Error>,
        deadline: Instant,
    ) -> Result<T, Error> {
        match written {
            Err(Error::Unauthorized { status: 401 }) => {
                match self.device(&device.uuid, deadline).await {
                    Ok(None) => Err(Error::DeviceGone {
                        device: device.uuid.to_string(),
                    }),
                    Ok(Some(_)) | Err(_) => Err(Error::Unauthorized { status: 401 }),
                }
            }
            other => other,
        }
    }

    /// Removes the variables `names` from `device`, device-wide and from every service on it.
    /// Nothing there is no error: a second run does nothing.
    pub async fn remove_env_vars(
        &self,
        device: &Device,
        names: &[&str],
        deadline: Instant,
    ) -> Result<(), Error> {
        let path = format!(
            "/v7/service_install?$select=id&$filter=device%20eq%20{}",
            device.id
        );
        let installs: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
        for name in names {
            self.delete(Field::EnvVar, device.id, name, deadline)
                .await?;
            for install in &installs {
                self.delete(Field::ServiceVar, install.id, name, deadline)
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether `device` has a variable `name`, device-wide or on any service.
    pub async fn has_env_var(
        &self,
        device: &Device,
        name: &str,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let name = odata_string(name);
        let path = format!(
            "/v7/device_environment_variable?$select=id&$filter=device%20eq%20{}%20and%20name%20eq%20{name}",
            device.id
        );
        let rows: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
        if !rows.is_empty() {
            return Ok(true);
        }
        let path = format!(
            "/v7/service_install?$select=id&$filter=device%20eq%20{}",
            device.id
        );
        let installs: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
        for install in installs {
            let path = format!(
                "/v7/device_service_environment_variable?$select=id&$filter=service_install%20eq%20{}%20and%20name%20eq%20{name}",
                install.id
            );
            let rows: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
            if !rows.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes the variables `names` of `service` on `device` only (nothing device-wide, no
    /// other service). Nothing there is no error.
    pub async fn remove_service_vars(
        &self,
        device: &Device,
        service: &str,
        names: &[&str],
        deadline: Instant,
    ) -> Result<(), Error> {
        let install = self.service_install(device, service, deadline).await?;
        for name in names {
            self.delete(Field::ServiceVar, install, name, deadline)
                .await?;
        }
        Ok(())
    }

    /// The id of `service`'s install on `device`: the service must be one of the fleet's, and
    /// installed on the device (the supervisor installs a release's services).
    pub async fn service_install(
        &self,
        device: &Device,
        service: &str,
        deadline: Instant,
    ) -> Result<u64, Error> {
        let path = format!(
            "/v7/service?$select=id&$filter=application%20eq%20{}%20and%20service_name%20eq%20{}",
            self.id(),
            odata_string(service)
        );
        let services: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
        let [svc] = services.as_slice() else {
            return Err(Error::NoService {
                service: service.to_owned(),
                fleet: self.id().get(),
            });
        };
        let path = format!(
            "/v7/service_install?$select=id&$filter=device%20eq%20{}%20and%20installs__service%20eq%20{}",
            device.id, svc.id
        );
        let installs: Vec<IdRow> = self.client().get_rows(&path, deadline).await?;
        match installs.as_slice() {
            [install] => Ok(install.id),
            _ => Err(Error::NotInstalled {
                service: service.to_owned(),
                device: device.uuid.to_string(),
            }),
        }
    }

    async fn delete(
        &self,
        field: Field,
        owner: u64,
        name: &str,
        deadline: Instant,
    ) -> Result<(), Error> {
        let path = format!(
            "/v7/{}?$filter={}%20eq%20{owner}%20and%20{}%20eq%20{}",
            field.resource(),
            field.owner_field(),
            field.key_field(),
            odata_string(name)
        );
        let answer = self
            .client()
            .send(Method::DELETE, &path, None, deadline)
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(answer.unexpected(None))
        }
    }

    /// Sets the fleet variable `name` to `value`: every device of the fleet sees it (unless a
    /// device or service variable of the same name overrides it).
    pub async fn set_fleet_env_var(
        &self,
        name: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        self.upsert(Field::FleetVar, self.id().get(), name, value, deadline)
            .await
    }

    /// Sets the tag `key` to `value` on `device`.
    pub async fn set_tag(
        &self,
        device: &Device,
        key: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        let written = self
            .upsert(Field::Tag, device.id, key, value, deadline)
            .await;
        self.unless_gone(device, written, deadline).await
    }

    async fn upsert(
        &self,
        field: Field,
        owner: u64,
        name: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        let mut body = serde_json::Map::new();
        body.insert(field.owner_field().into(), owner.into());
        body.insert(field.key_field().into(), name.into());
        body.insert("value".into(), value.into());
        let create = serde_json::Value::Object(body);
        let path = format!("/v7/{}", field.resource());
        let client = self.client();
        let answer = client
            .send(Method::POST, &path, Some(&create), deadline)
            .await?;
        match answer.status {
            StatusCode::CREATED | StatusCode::OK => return Ok(Upserted::Created),
            StatusCode::CONFLICT => {}
            _ => return Err(answer.unexpected(Some(value))),
        }
        let path = format!(
            "/v7/{}?$filter={}%20eq%20{owner}%20and%20{}%20eq%20{}",
            field.resource(),
            field.owner_field(),
            field.key_field(),
            odata_string(name)
        );
        let update = serde_json::json!({ "value": value });
        let answer = client
            .send(Method::PATCH, &path, Some(&update), deadline)
            .await?;
        if answer.status.is_success() {
            Ok(Upserted::Updated)
        } else {
            Err(answer.unexpected(Some(value)))
        }
    }
}
