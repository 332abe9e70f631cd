//! Writes to a device of the pinned fleet: environment variables and tags, set by POST and,
//! when balena answers 409 (the name exists), by PATCHing the existing row.

use reqwest::{Method, StatusCode};
use tokio::time::Instant;

use crate::client::odata_string;
use crate::{Device, Error, Fleet};

/// Where a variable is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A device environment variable: every service on the device sees it.
    Device,
}

/// What a device carries that jitr writes: environment variables or tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// `device_environment_variable` (`name`, `value`).
    EnvVar,
    /// `device_tag` (`tag_key`, `value`): shown in the balena dashboard.
    Tag,
}

impl Field {
    fn resource(self) -> &'static str {
        match self {
            Field::EnvVar => "device_environment_variable",
            Field::Tag => "device_tag",
        }
    }

    fn key_field(self) -> &'static str {
        match self {
            Field::EnvVar => "name",
            Field::Tag => "tag_key",
        }
    }
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
        match scope {
            Scope::Device => {
                self.upsert(Field::EnvVar, device, name, value, deadline)
                    .await
            }
        }
    }

    /// Sets the tag `key` to `value` on `device`.
    pub async fn set_tag(
        &self,
        device: &Device,
        key: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        self.upsert(Field::Tag, device, key, value, deadline).await
    }

    async fn upsert(
        &self,
        field: Field,
        device: &Device,
        name: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, Error> {
        let mut body = serde_json::Map::new();
        body.insert("device".into(), device.id.into());
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
            "/v7/{}?$filter=device%20eq%20{}%20and%20{}%20eq%20{}",
            field.resource(),
            device.id,
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
