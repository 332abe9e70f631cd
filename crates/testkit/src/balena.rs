//! A fake of the balena API v7 (pinejs/OData) for the calls jitr makes, errors included.
//!
//! Modelled resources: `application` (fleets), `device`, `service` (a fleet's services),
//! `service_install` (a service on a device), `device_environment_variable`,
//! `device_service_environment_variable` (a variable of one service on one device),
//! `device_tag` and `application_environment_variable` (a fleet's own variables); GET, POST, PATCH and DELETE (by `$filter`, answering 200 `OK` whether or not
//! anything matched, as pinejs does). Answers follow `testdata/balena/`: every read is HTTP 200 `{"d":[...]}`
//! (empty when nothing matches *or* the key cannot see it), a navigation property is
//! `{"__id": N}`, each row carries `__metadata.uri`. Errors are plain text, as pinejs sends them:
//! 401 `Unauthorized`, 400 for a query it cannot parse, 409 for a unique-key violation, 429 with
//! `Retry-After`. Query options the fake does not model (`$expand`, `$orderby` other than by id,
//! ...) get a 400 that
//! says so, rather than an answer that silently ignores them.

mod odata;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::server::BackgroundServer;
use odata::Filter;

/// A failure the fake answers with instead of serving requests normally.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serve normally.
    #[default]
    None,
    /// Answer every request with this status (e.g. 500, 503, 401) until the fault is changed.
    Status(u16),
    /// Answer the next `times` requests with 429 and `Retry-After: retry_after_secs`, then serve.
    RateLimited {
        /// Seconds announced in the `Retry-After` header.
        retry_after_secs: u64,
        /// How many requests are refused before service resumes.
        times: u32,
    },
    /// Wait this long before serving each request.
    Delay(Duration),
    /// Answer every write (POST, PATCH) with this status, serve reads: a key that may read
    /// but not write, or a write path in trouble.
    WriteStatus(u16),
    /// Serve the next `ok` creations (POST), then answer every POST with `status` (a write
    /// path that fails half-way through a delivery); other requests are served.
    PostStatusAfter {
        /// Creations served first.
        ok: u32,
        /// The status of every later POST.
        status: u16,
    },
    /// Serve the next `ok` creations (POST), then answer every write (POST, PATCH, DELETE)
    /// with `status` as [`Fault::WriteStatus`] does: a delivery cut off half-way whose undo
    /// cannot remove what was written either.
    WritesFailAfter {
        /// Creations served first.
        ok: u32,
        /// The status of every later write.
        status: u16,
    },
    /// Answer every read with HTTP 200 and a JSON-looking body of this many bytes (a proxy
    /// gone wrong, or a query that matched far too much).
    Body {
        /// The body's size.
        bytes: usize,
    },
    /// Answer every read's headers at once, then trickle its body over this long.
    SlowBody(Duration),
    /// Answer every device read as if the fleet filter were ignored: rows of this fleet.
    ForeignRow {
        /// The fleet the rows name.
        fleet: u64,
    },
}

/// One request as the fake received it (the API key itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path without the query, e.g. `/v7/device`.
    pub path: String,
    /// Percent-decoded query, pairs joined as `name=value&...` (e.g. `$filter=uuid eq 'x'`).
    pub query: String,
    /// Whether an `Authorization` header was present.
    pub has_authorization: bool,
    /// Whether it was `Bearer <the key the fake was started with>`.
    pub authorized: bool,
}

/// A running fake balena API; dropping it stops the server.
pub struct FakeBalena {
    server: BackgroundServer,
    state: Arc<Mutex<Db>>,
}

impl fmt::Debug for FakeBalena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately leaves out the API key.
        f.debug_struct("FakeBalena")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl FakeBalena {
    /// Starts the fake on a free loopback port; requests must carry `Bearer <api_key>`.
    pub fn start(api_key: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(Db::new(api_key)));
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let server = BackgroundServer::start("fake-balena", router)?;
        Ok(Self { server, state })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (the value for `BALENA_API_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Adds a fleet (an `application`) the key can see.
    pub fn add_fleet(&self, id: u64, slug: &str) {
        self.db().fleets.insert(
            id,
            Fleet {
                slug: slug.to_owned(),
                hidden: false,
            },
        );
    }

    /// Adds a device to a fleet and returns its numeric id.
    pub fn add_device(&self, fleet_id: u64, uuid: &str, is_active: bool) -> u64 {
        let mut db = self.db();
        let id = db.next_id();
        db.devices.insert(
            id,
            Device {
                uuid: uuid.to_owned(),
                fleet_id,
                is_active,
            },
        );
        id
    }

    /// The numeric id of the device with this UUID, if the fake holds one.
    pub fn device_id(&self, uuid: &str) -> Option<u64> {
        self.db()
            .devices
            .iter()
            .find(|(_, d)| d.uuid == uuid)
            .map(|(id, _)| *id)
    }

    /// Adds a service to a fleet and returns its id.
    pub fn add_service(&self, fleet_id: u64, name: &str) -> u64 {
        let mut db = self.db();
        let id = db.next_id();
        db.services.insert(
            id,
            Service {
                fleet_id,
                name: name.to_owned(),
            },
        );
        id
    }

    /// Installs a service on a device (what the supervisor does when it runs a release) and
    /// returns the service install's id.
    pub fn install(&self, device_id: u64, service_id: u64) -> u64 {
        let mut db = self.db();
        let id = db.next_id();
        db.installs.insert(id, (device_id, service_id));
        id
    }

    /// A device's service variables as `(service name, name, value)`, in creation order.
    pub fn service_vars(&self, device_id: u64) -> Vec<(String, String, String)> {
        let db = self.db();
        db.service_vars
            .values()
            .filter_map(|v| {
                let (device, service) = db.installs.get(&v.device)?;
                (*device == device_id).then(|| {
                    let name = db.services.get(service).map(|s| s.name.clone());
                    (name.unwrap_or_default(), v.key.clone(), v.value.clone())
                })
            })
            .collect()
    }

    /// Deletes a device, as balena does: its variables, tags and service installs go with it.
    pub fn remove_device(&self, device_id: u64) {
        let mut db = self.db();
        db.devices.remove(&device_id);
        let installs: Vec<u64> = db
            .installs
            .iter()
            .filter(|(_, (device, _))| *device == device_id)
            .map(|(id, _)| *id)
            .collect();
        db.installs.retain(|_, (device, _)| *device != device_id);
        db.env_vars.retain(|_, v| v.device != device_id);
        db.tags.retain(|_, v| v.device != device_id);
        db.service_vars.retain(|_, v| !installs.contains(&v.device));
    }

    /// Marks a device active or inactive.
    pub fn set_device_active(&self, device_id: u64, is_active: bool) {
        if let Some(device) = self.db().devices.get_mut(&device_id) {
            device.is_active = is_active;
        }
    }

    /// Makes a fleet, its devices and their variables and tags invisible to the key.
    pub fn hide_fleet_from_key(&self, fleet_id: u64) {
        let mut db = self.db();
        let fleet = db.fleets.entry(fleet_id).or_insert_with(|| Fleet {
            slug: format!("hidden/fleet-{fleet_id}"),
            hidden: false,
        });
        fleet.hidden = true;
    }

    /// Sets the fault injected into the following requests.
    pub fn set_fault(&self, fault: Fault) {
        self.db().fault = fault;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.db().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.db().requests.clear();
    }

    /// A device's environment variables as `(name, value)`, in creation order.
    pub fn env_vars(&self, device_id: u64) -> Vec<(String, String)> {
        self.db()
            .env_vars
            .values()
            .filter(|v| v.device == device_id)
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect()
    }

    /// Sets a device-wide variable directly (what an owner or `jitr issue --push-balena` left).
    pub fn add_env_var(&self, device_id: u64, name: &str, value: &str) {
        let mut db = self.db();
        let id = db.next_id();
        db.env_vars.insert(
            id,
            Variable {
                device: device_id,
                key: name.to_owned(),
                value: value.to_owned(),
            },
        );
    }

    /// A fleet's own variables as `(name, value)`, in creation order.
    pub fn fleet_vars(&self, fleet_id: u64) -> Vec<(String, String)> {
        self.db()
            .fleet_vars
            .values()
            .filter(|v| v.device == fleet_id)
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect()
    }

    /// A device's tags as `(tag_key, value)`, in creation order.
    pub fn tags(&self, device_id: u64) -> Vec<(String, String)> {
        self.db()
            .tags
            .values()
            .filter(|t| t.device == device_id)
            .map(|t| (t.key.clone(), t.value.clone()))
            .collect()
    }

    /// Locks the state; a panic elsewhere must not hide the state from the test.
    fn db(&self) -> MutexGuard<'_, Db> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fake's whole state.
struct Db {
    api_key: String,
    fault: Fault,
    fleets: BTreeMap<u64, Fleet>,
    devices: BTreeMap<u64, Device>,
    services: BTreeMap<u64, Service>,
    /// Service installs: (device, service).
    installs: BTreeMap<u64, (u64, u64)>,
    env_vars: BTreeMap<u64, Variable>,
    service_vars: BTreeMap<u64, Variable>,
    tags: BTreeMap<u64, Variable>,
    /// Fleet-wide variables (`application_environment_variable`; `device` is the fleet).
    fleet_vars: BTreeMap<u64, Variable>,
    last_id: u64,
    requests: Vec<RecordedRequest>,
}

/// A fleet (`application`).
struct Fleet {
    slug: String,
    hidden: bool,
}

/// A device.
struct Device {
    uuid: String,
    fleet_id: u64,
    is_active: bool,
}

/// A service of a fleet.
struct Service {
    fleet_id: u64,
    name: String,
}

/// A device environment variable, a device service variable or a device tag (`key` is
/// `name` or `tag_key`; `device` is the service install for a service variable).
struct Variable {
    device: u64,
    key: String,
    value: String,
}

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Application,
    Device,
    Service,
    ServiceInstall,
    EnvVar,
    ServiceVar,
    Tag,
    FleetVar,
}

impl Resource {
    /// Parses the resource name in `/v7/<name>`.
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "application" => Self::Application,
            "device" => Self::Device,
            "service" => Self::Service,
            "service_install" => Self::ServiceInstall,
            "device_environment_variable" => Self::EnvVar,
            "device_service_environment_variable" => Self::ServiceVar,
            "device_tag" => Self::Tag,
            "application_environment_variable" => Self::FleetVar,
            _ => return None,
        })
    }

    /// The resource name as it appears in URLs.
    fn name(self) -> &'static str {
        match self {
            Self::Application => "application",
            Self::Device => "device",
            Self::Service => "service",
            Self::ServiceInstall => "service_install",
            Self::EnvVar => "device_environment_variable",
            Self::ServiceVar => "device_service_environment_variable",
            Self::Tag => "device_tag",
            Self::FleetVar => "application_environment_variable",
        }
    }

    /// The name of the variable's key field (`name` or `tag_key`), for variable resources.
    fn key_field(self) -> &'static str {
        match self {
            Self::Tag => "tag_key",
            _ => "name",
        }
    }

    /// The field naming what a variable belongs to (a device, or a service install).
    fn owner_field(self) -> &'static str {
        match self {
            Self::ServiceVar => "service_install",
            Self::FleetVar => "application",
            _ => "device",
        }
    }

    /// Whether this is a resource of variables (written by POST/PATCH/DELETE).
    fn is_variable(self) -> bool {
        matches!(
            self,
            Self::EnvVar | Self::ServiceVar | Self::Tag | Self::FleetVar
        )
    }
}

impl Db {
    fn new(api_key: &str) -> Self {
        Self {
            api_key: api_key.to_owned(),
            fault: Fault::None,
            fleets: BTreeMap::new(),
            devices: BTreeMap::new(),
            services: BTreeMap::new(),
            installs: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            service_vars: BTreeMap::new(),
            tags: BTreeMap::new(),
            fleet_vars: BTreeMap::new(),
            last_id: 1_000_000,
            requests: Vec::new(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    fn fleet_visible(&self, fleet_id: u64) -> bool {
        self.fleets.get(&fleet_id).is_none_or(|f| !f.hidden)
    }

    fn device_visible(&self, device_id: u64) -> bool {
        self.devices
            .get(&device_id)
            .is_some_and(|d| self.fleet_visible(d.fleet_id))
    }

    fn variables(&self, resource: Resource) -> &BTreeMap<u64, Variable> {
        match resource {
            Resource::Tag => &self.tags,
            Resource::ServiceVar => &self.service_vars,
            Resource::FleetVar => &self.fleet_vars,
            _ => &self.env_vars,
        }
    }

    fn variables_mut(&mut self, resource: Resource) -> &mut BTreeMap<u64, Variable> {
        match resource {
            Resource::Tag => &mut self.tags,
            Resource::ServiceVar => &mut self.service_vars,
            Resource::FleetVar => &mut self.fleet_vars,
            _ => &mut self.env_vars,
        }
    }

    /// Whether the key can see a variable's owner: `None` when there is no such owner.
    fn owner_visible(&self, resource: Resource, owner: u64) -> Option<bool> {
        match resource {
            Resource::FleetVar => self.fleets.get(&owner).map(|f| !f.hidden),
            _ => self
                .owner_device(resource, owner)
                .map(|d| self.device_visible(d)),
        }
    }

    /// The device a variable's owner is or belongs to.
    fn owner_device(&self, resource: Resource, owner: u64) -> Option<u64> {
        match resource {
            Resource::ServiceVar => self.installs.get(&owner).map(|(device, _)| *device),
            _ => self.devices.contains_key(&owner).then_some(owner),
        }
    }

    /// Every row of `resource` the key can see, with all fields (navigation as `{"__id": N}`).
    /// The rows of `resource` the key can see; with `uuid`, only devices of that UUID are
    /// built (an index: the filter that names the UUID still runs on them).
    fn visible_rows(&self, resource: Resource, uuid: Option<&str>) -> Vec<Map<String, Value>> {
        let rows: Vec<Value> = match resource {
            Resource::Application => self
                .fleets
                .iter()
                .filter(|(_, f)| !f.hidden)
                .map(|(id, f)| {
                    let app_name = f.slug.rsplit('/').next().unwrap_or(&f.slug);
                    json!({"id": id, "slug": f.slug, "app_name": app_name})
                })
                .collect(),
            Resource::Device => self
                .devices
                .iter()
                .filter(|(_, d)| uuid.is_none_or(|uuid| d.uuid == uuid))
                .filter(|(_, d)| self.fleet_visible(d.fleet_id))
                .map(|(id, d)| {
                    json!({
                        "id": id,
                        "uuid": d.uuid,
                        "is_active": d.is_active,
                        "belongs_to__application": {"__id": d.fleet_id},
                    })
                })
                .collect(),
            Resource::Service => self
                .services
                .iter()
                .filter(|(_, s)| self.fleet_visible(s.fleet_id))
                .map(|(id, s)| {
                    json!({"id": id, "service_name": s.name, "application": {"__id": s.fleet_id}})
                })
                .collect(),
            Resource::ServiceInstall => self
                .installs
                .iter()
                .filter(|(_, (device, _))| self.device_visible(*device))
                .map(|(id, (device, service))| {
                    json!({"id": id, "device": {"__id": device}, "installs__service": {"__id": service}})
                })
                .collect(),
            Resource::EnvVar | Resource::ServiceVar | Resource::Tag | Resource::FleetVar => self
                .variables(resource)
                .iter()
                .filter(|(_, v)| self.owner_visible(resource, v.device) == Some(true))
                .map(|(id, v)| {
                    let mut row = json!({"id": id});
                    row[resource.owner_field()] = json!({"__id": v.device});
                    row[resource.key_field()] = json!(v.key);
                    row["value"] = json!(v.value);
                    row
                })
                .collect(),
        };
        rows.into_iter()
            .filter_map(|row| match row {
                Value::Object(map) => Some(map),
                _ => None,
            })
            .collect()
    }
}

/// Adds `__metadata` the way pinejs does.
fn with_metadata(resource: Resource, mut row: Map<String, Value>, id: &Value) -> Value {
    row.insert(
        "__metadata".to_owned(),
        json!({"uri": format!("/resin/{}(@id)?@id={id}", resource.name())}),
    );
    Value::Object(row)
}

/// A plain-text answer, as pinejs sends its errors.
fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

/// A JSON answer.
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// A 400 with a plain-text message.
fn bad_request(message: &str) -> Response {
    text(StatusCode::BAD_REQUEST, message)
}

/// The single handler: records, applies faults, checks the key, then routes.
async fn handle(
    State(state): State<Arc<Mutex<Db>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let pairs = match Query::<Vec<(String, String)>>::try_from_uri(&uri) {
        Ok(Query(pairs)) => Ok(pairs),
        Err(e) => Err(e.body_text()),
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());

    let fault = {
        let mut db = lock();
        let authorized = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|key| key == db.api_key);
        db.requests.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: match &pairs {
                Ok(pairs) => pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&"),
                Err(_) => uri.query().unwrap_or_default().to_owned(),
            },
            has_authorization: authorization.is_some(),
            authorized,
        });
        let mut fault = db.fault.clone();
        if let Fault::PostStatusAfter { ok, status } = fault {
            if method == Method::POST && ok > 0 {
                db.fault = Fault::PostStatusAfter { ok: ok - 1, status };
                fault = Fault::None;
            } else if method != Method::POST {
                fault = Fault::None;
            }
        }
        if let Fault::WritesFailAfter { ok, status } = fault {
            if ok == 0 {
                db.fault = Fault::WriteStatus(status);
                fault = Fault::WriteStatus(status);
            } else if method == Method::POST {
                db.fault = Fault::WritesFailAfter { ok: ok - 1, status };
                fault = Fault::None;
            } else {
                fault = Fault::None;
            }
        }
        if let Fault::RateLimited {
            retry_after_secs,
            times,
        } = fault
        {
            db.fault = if times > 1 {
                Fault::RateLimited {
                    retry_after_secs,
                    times: times - 1,
                }
            } else {
                Fault::None
            };
        }
        (fault, authorized)
    };

    let authorized = match fault {
        (Fault::None, authorized) => authorized,
        (Fault::Delay(delay), authorized) => {
            tokio::time::sleep(delay).await;
            authorized
        }
        (Fault::WriteStatus(code), _)
            if method == Method::POST || method == Method::PATCH || method == Method::DELETE =>
        {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(status, status.canonical_reason().unwrap_or("Error"));
        }
        (Fault::WriteStatus(_), authorized) => authorized,
        (Fault::PostStatusAfter { status, .. }, _) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(status, status.canonical_reason().unwrap_or("Error"));
        }
        (Fault::Body { bytes }, _) if method == Method::GET => return oversized(bytes),
        (Fault::SlowBody(over), _) if method == Method::GET => return trickled(over),
        (Fault::Body { .. } | Fault::SlowBody(_) | Fault::ForeignRow { .. }, authorized) => {
            authorized
        }
        (Fault::Status(code), _) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(status, status.canonical_reason().unwrap_or("Error"));
        }
        (Fault::RateLimited { times: 0, .. }, authorized) => authorized,
        // Turned into None or WriteStatus above.
        (Fault::WritesFailAfter { .. }, authorized) => authorized,
        (
            Fault::RateLimited {
                retry_after_secs, ..
            },
            _,
        ) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                    (header::RETRY_AFTER, retry_after_secs.to_string()),
                ],
                "Too Many Requests",
            )
                .into_response();
        }
    };
    if !authorized {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let pairs = match pairs {
        Ok(pairs) => pairs,
        Err(message) => return bad_request(&message),
    };

    let Some(target) = uri.path().strip_prefix("/v7/") else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    let (name, key) = match target.split_once('(') {
        Some((name, rest)) => match rest.strip_suffix(')').map(str::parse::<u64>) {
            Some(Ok(id)) => (name, Some(id)),
            _ => return bad_request("Malformed url"),
        },
        None => (target, None),
    };
    let Some(resource) = Resource::from_name(name) else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    let options = match QueryOptions::parse(&pairs) {
        Ok(options) => options,
        Err(message) => return bad_request(&message),
    };

    let mut db = lock();
    if let (Fault::ForeignRow { fleet }, Resource::Device) = (&db.fault, resource) {
        if method == Method::GET {
            let fleet = *fleet;
            return foreign_rows(&db, fleet);
        }
    }
    match method {
        Method::GET => get(&db, resource, key, &options),
        Method::POST if key.is_none() => post(&mut db, resource, &body),
        Method::PATCH => patch(&mut db, resource, key, &options, &body),
        Method::DELETE => delete(&mut db, resource, key, &options),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
    }
}

/// HTTP 200 with a body of `bytes` bytes that starts like an OData answer, streamed in
/// 64 KiB chunks without a Content-Length (so only a client that counts stops it early).
fn oversized(bytes: usize) -> Response {
    const CHUNK: usize = 64 * 1024;
    let pieces = futures::stream::unfold(0usize, move |sent| async move {
        if sent >= bytes {
            return None;
        }
        let len = CHUNK.min(bytes - sent);
        let mut piece = vec![b' '; len];
        if sent == 0 {
            let head = b"{\"d\":[";
            let n = head.len().min(len);
            piece[..n].copy_from_slice(&head[..n]);
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(piece)), sent + len))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        axum::body::Body::from_stream(pieces),
    )
        .into_response()
}

/// HTTP 200 whose body arrives in ten pieces spread over `over`.
fn trickled(over: Duration) -> Response {
    let pieces = futures::stream::unfold(0u32, move |n| async move {
        if n == 10 {
            return None;
        }
        tokio::time::sleep(over / 10).await;
        let piece = if n == 0 {
            "{\"d\":["
        } else if n == 9 {
            "]}"
        } else {
            " "
        };
        Some((Ok::<_, std::io::Error>(Bytes::from(piece)), n + 1))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        axum::body::Body::from_stream(pieces),
    )
        .into_response()
}

/// Every device the key can see, each claimed to be in `fleet`.
fn foreign_rows(db: &Db, fleet: u64) -> Response {
    let rows: Vec<Value> = db
        .devices
        .iter()
        .map(|(id, d)| {
            json!({"id": id, "uuid": d.uuid, "is_active": d.is_active,
                   "belongs_to__application": {"__id": fleet}})
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "d": rows }))
}

/// The OData query options the fake understands.
#[derive(Debug, Default)]
struct QueryOptions {
    select: Option<Vec<String>>,
    filter: Option<Filter>,
    top: Option<usize>,
    skip: usize,
}

impl QueryOptions {
    fn parse(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut options = Self::default();
        for (name, value) in pairs {
            match name.as_str() {
                "$select" => {
                    options.select = Some(value.split(',').map(|f| f.trim().to_owned()).collect());
                }
                "$filter" => options.filter = Some(odata::parse_filter(value)?),
                "$top" | "$skip" => {
                    let n: usize = value
                        .parse()
                        .map_err(|_| format!("{name} must be a non-negative integer"))?;
                    if name == "$top" {
                        options.top = Some(n);
                    } else {
                        options.skip = n;
                    }
                }
                // Rows are kept in id order: that is the only order the fake answers in.
                "$orderby" if value == "id asc" || value == "id" => {}
                other if other.starts_with('$') => {
                    return Err(format!(
                        "testkit FakeBalena does not model the query option {other}"
                    ))
                }
                // pinejs ignores parameters that are not query options.
                _ => {}
            }
        }
        Ok(options)
    }
}

/// The rows of `resource` that match the key predicate and `$filter`.
fn matching_rows(
    db: &Db,
    resource: Resource,
    key: Option<u64>,
    filter: Option<&Filter>,
) -> Result<Vec<Map<String, Value>>, String> {
    let uuid = filter.and_then(|f| {
        f.conditions.iter().find_map(|(field, value)| match value {
            odata::Literal::Str(uuid) if field == "uuid" => Some(uuid.as_str()),
            _ => None,
        })
    });
    let mut rows = Vec::new();
    for row in db.visible_rows(resource, uuid) {
        if key.is_some_and(|key| row.get("id") != Some(&json!(key))) {
            continue;
        }
        if let Some(filter) = filter {
            if !odata::matches(filter, &row)? {
                continue;
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn get(db: &Db, resource: Resource, key: Option<u64>, options: &QueryOptions) -> Response {
    let rows = match matching_rows(db, resource, key, options.filter.as_ref()) {
        Ok(rows) => rows,
        Err(message) => return bad_request(&message),
    };
    let mut out = Vec::with_capacity(rows.len());
    let page = rows
        .into_iter()
        .skip(options.skip)
        .take(options.top.unwrap_or(usize::MAX));
    for row in page {
        let id = row.get("id").cloned().unwrap_or(Value::Null);
        let row = match &options.select {
            None => row,
            Some(fields) => {
                let mut selected = Map::new();
                for field in fields {
                    let Some(value) = row.get(field) else {
                        return bad_request(&format!("Unknown field '{field}' in $select"));
                    };
                    selected.insert(field.clone(), value.clone());
                }
                selected
            }
        };
        out.push(with_metadata(resource, row, &id));
    }
    json_response(StatusCode::OK, &json!({ "d": out }))
}

fn post(db: &mut Db, resource: Resource, body: &[u8]) -> Response {
    if !resource.is_variable() {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return bad_request("Invalid JSON body");
    };
    let (key_field, owner_field) = (resource.key_field(), resource.owner_field());
    // pinejs takes a foreign key as a number, a numeric string or `{"__id": N}`.
    let device = fields.get(owner_field).and_then(|d| {
        d.as_u64()
            .or_else(|| d.as_str().and_then(|s| s.parse().ok()))
            .or_else(|| d.get("__id").and_then(Value::as_u64))
    });
    let (Some(device), Some(Value::String(key)), Some(Value::String(value))) =
        (device, fields.get(key_field), fields.get("value"))
    else {
        return bad_request(&format!(
            "\"{owner_field}\", \"{key_field}\" and \"value\" are required"
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| ![owner_field, key_field, "value"].contains(&k.as_str()))
    {
        return bad_request(&format!("Unknown field '{unknown}'"));
    }
    if let Err(message) = validate_key(resource, key) {
        return bad_request(&message);
    }
    match db.owner_visible(resource, device) {
        // The real API answers a write whose parent row does not exist (a deleted device)
        // 401, as it answers a refused key, not pinejs's 400 "Foreign key constraint
        // violated" (issue #23 records it from balena-sdk's source, which reads such a 401 as
        // a missing device). Only a lookup with the same key tells the two apart.
        None => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Some(false) => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Some(true) => {}
    }
    if db
        .variables(resource)
        .values()
        .any(|v| v.device == device && v.key == *key)
    {
        return text(StatusCode::CONFLICT, "Unique key constraint violated");
    }
    let id = db.next_id();
    db.variables_mut(resource).insert(
        id,
        Variable {
            device,
            key: key.clone(),
            value: value.clone(),
        },
    );
    let mut row = Map::new();
    row.insert("id".to_owned(), json!(id));
    row.insert(owner_field.to_owned(), json!({"__id": device}));
    row.insert(key_field.to_owned(), json!(key));
    row.insert("value".to_owned(), json!(value));
    json_response(
        StatusCode::CREATED,
        &with_metadata(resource, row, &json!(id)),
    )
}

/// The naming rules balena enforces on variable names and tag keys.
fn validate_key(resource: Resource, key: &str) -> Result<(), String> {
    match resource {
        Resource::Tag if key.trim().is_empty() => {
            Err("It is necessary that each device tag has a tag key that has a Length (Type) that is greater than 0.".to_owned())
        }
        Resource::EnvVar | Resource::ServiceVar => {
            let mut chars = key.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                Err("Variable names may only contain alphanumeric characters and underscores, and may not start with a number.".to_owned())
            } else if key.starts_with("RESIN_") || key.starts_with("BALENA_") {
                Err("Environment variables beginning with RESIN_ or BALENA_ are reserved.".to_owned())
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn patch(
    db: &mut Db,
    resource: Resource,
    key: Option<u64>,
    options: &QueryOptions,
    body: &[u8],
) -> Response {
    if !resource.is_variable() {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return bad_request("Invalid JSON body");
    };
    let value = match (fields.len(), fields.get("value")) {
        (1, Some(Value::String(value))) => value.clone(),
        _ => return bad_request("Only a string \"value\" may be patched"),
    };
    let rows = match matching_rows(db, resource, key, options.filter.as_ref()) {
        Ok(rows) => rows,
        Err(message) => return bad_request(&message),
    };
    let ids: Vec<u64> = rows
        .iter()
        .filter_map(|row| row.get("id").and_then(Value::as_u64))
        .collect();
    for id in ids {
        if let Some(variable) = db.variables_mut(resource).get_mut(&id) {
            variable.value.clone_from(&value);
        }
    }
    // pinejs answers a PATCH with 200 and the body "OK", whether or not any row matched.
    text(StatusCode::OK, "OK")
}

/// DELETE by key or `$filter`: every matching variable the key can see goes; pinejs answers
/// 200 `OK` whether or not any matched.
fn delete(db: &mut Db, resource: Resource, key: Option<u64>, options: &QueryOptions) -> Response {
    if !resource.is_variable() {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    if key.is_none() && options.filter.is_none() {
        return bad_request("A DELETE needs a key or a $filter");
    }
    let rows = match matching_rows(db, resource, key, options.filter.as_ref()) {
        Ok(rows) => rows,
        Err(message) => return bad_request(&message),
    };
    for id in rows
        .iter()
        .filter_map(|row| row.get("id").and_then(Value::as_u64))
    {
        db.variables_mut(resource).remove(&id);
    }
    text(StatusCode::OK, "OK")
}

#[cfg(test)]
mod tests;
