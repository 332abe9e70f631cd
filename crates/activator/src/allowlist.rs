//! A static [`FleetDirectory`]: a file of device ids, one per line.

use std::collections::HashSet;
use std::path::Path;

use factory_ca::{DeviceId, IdFormat};
use tokio::time::Instant;

use crate::{ConfigError, FleetDirectory, FleetError, FleetMember, Membership};

/// Devices listed in `JITR_ALLOWLIST`.
#[derive(Debug, Clone)]
pub struct AllowlistDirectory {
    ids: HashSet<String>,
}

impl AllowlistDirectory {
    /// Reads the file: one id per line, blank lines and `#` comments skipped.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
            var: "JITR_ALLOWLIST",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Invalid {
            var: "JITR_ALLOWLIST",
            reason: format!("{}: {reason}", path.display()),
        })
    }

    /// Parses the list.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ids = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id =
                DeviceId::parse(line, IdFormat::Any).map_err(|e| format!("line {}: {e}", n + 1))?;
            ids.insert(id.as_str().to_owned());
        }
        Ok(AllowlistDirectory { ids })
    }

    /// Every id listed.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(String::as_str)
    }

    /// From ids in memory.
    pub fn from_ids<I: IntoIterator<Item = String>>(ids: I) -> Self {
        AllowlistDirectory {
            ids: ids.into_iter().collect(),
        }
    }
}

impl FleetDirectory for AllowlistDirectory {
    async fn membership(
        &self,
        device: &DeviceId,
        _deadline: Instant,
    ) -> Result<Membership, FleetError> {
        Ok(if self.ids.contains(device.as_str()) {
            Membership::Member(FleetMember {
                device: device.clone(),
                handle: None,
            })
        } else {
            Membership::NotMember
        })
    }

    fn label(&self) -> String {
        "the allowlist".into()
    }

    fn mark(&self) -> crate::ownership::FleetMark {
        crate::ownership::FleetMark::Allowlist
    }
}
