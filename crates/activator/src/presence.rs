//! Proof of use: which certificate each device connected with, and when.
//!
//! AWS IoT publishes `$aws/events/presence/connected/<clientId>` on every accepted connection,
//! carrying the certificate id (`principalIdentifier`), the client id (a jitr device's Thing
//! name) and the time. The stack's presence topic rule (`rules/presence-rule.json`) writes each
//! one into the presence table, one item per device and certificate: `device_id` (partition
//! key), `certificate_id` (sort key), `connected_at` (epoch milliseconds, the latest).
//!
//! The rule of proof: an old certificate is retired (by `jitr rotate` or `jitr status --fix`)
//! only once its successor has connected. Without a record a duplicate is reported and held for
//! the operator, never revoked.

use std::collections::HashMap;
use std::future::Future;

use serde::Serialize;
use tokio::time::Instant;

use iot::RegistryError;

/// One certificate a device connected with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// The certificate id (`principalIdentifier`).
    pub certificate_id: String,
    /// When it last connected, epoch milliseconds.
    pub connected_at: i64,
}

/// Where the presence records are read.
pub trait PresenceLog: Send + Sync {
    /// Every device's connections, by device id (the whole table, every page).
    fn all(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<HashMap<String, Vec<Connection>>, RegistryError>> + Send;
    /// One device's connections.
    fn device(
        &self,
        device: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<Connection>, RegistryError>> + Send;
}

/// Whether `certificate_id` has connected (at or after `since`, epoch milliseconds, when given).
pub fn has_connected(connections: &[Connection], certificate_id: &str, since: Option<i64>) -> bool {
    connections
        .iter()
        .any(|c| c.certificate_id == certificate_id && since.is_none_or(|s| c.connected_at >= s))
}

/// The certificate that connected last.
pub fn last_connected(connections: &[Connection]) -> Option<&Connection> {
    connections.iter().max_by_key(|c| c.connected_at)
}

/// Waits until `device` has connected with `certificate_id` (at or after `since`), asking `log`
/// every `poll`, for at most until `until`: whether it did. Read errors end the wait (the
/// caller decides; nothing is retired on a failed read).
pub async fn wait_connected<P: PresenceLog>(
    log: &P,
    device: &str,
    certificate_id: &str,
    since: Option<i64>,
    poll: std::time::Duration,
    until: Instant,
) -> Result<bool, RegistryError> {
    loop {
        let connections = log.device(device, until).await?;
        if has_connected(&connections, certificate_id, since) {
            return Ok(true);
        }
        if Instant::now() + poll > until {
            return Ok(false);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Presence records kept in memory (tests, and a world without a presence table: nothing).
#[derive(Debug, Default)]
pub struct MemoryPresence {
    records: std::sync::Mutex<HashMap<String, Vec<Connection>>>,
}

impl MemoryPresence {
    /// An empty log.
    pub fn new() -> MemoryPresence {
        MemoryPresence::default()
    }

    /// Records that `device` connected with `certificate_id` at `at` (epoch milliseconds), as
    /// the topic rule's PutItem does: one record per device and certificate, the latest time.
    pub fn record(&self, device: &str, certificate_id: &str, at: i64) {
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = records.entry(device.to_owned()).or_default();
        list.retain(|c| c.certificate_id != certificate_id);
        list.push(Connection {
            certificate_id: certificate_id.to_owned(),
            connected_at: at,
        });
    }
}

impl PresenceLog for MemoryPresence {
    async fn all(
        &self,
        _deadline: Instant,
    ) -> Result<HashMap<String, Vec<Connection>>, RegistryError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone())
    }

    async fn device(
        &self,
        device: &str,
        _deadline: Instant,
    ) -> Result<Vec<Connection>, RegistryError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(device)
            .cloned()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_record_per_device_and_certificate_the_latest_time() {
        let log = MemoryPresence::new();
        log.record("d", "old", 1);
        log.record("d", "new", 5);
        log.record("d", "old", 9);
        let d = log.device("d", Instant::now()).await.unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(last_connected(&d).unwrap().certificate_id, "old");
        assert!(has_connected(&d, "new", Some(5)));
        assert!(!has_connected(&d, "new", Some(6)));
        assert!(!has_connected(&d, "other", None));
        assert!(log.device("e", Instant::now()).await.unwrap().is_empty());
    }
}
