//! The one moto world the suites start from: AWS IoT as a moto server with a jitr CA
//! registered and, as asked, the device policy made, balena's fake API with one fleet, and
//! another application's things planted ([`crate::foreign`]), as a real account holds them.
//!
//! Each suite keeps its own `World` for what only it needs (a manifest folder, a ledger
//! table, the Runtime API emulator) and takes the shared parts from [`World`] by name:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let rt = testkit::world::runtime();
//! let testkit::world::World { moto, client, ca, ca_id, .. } =
//!     testkit::world::Spec::new("status test CA").policy("jitr-device").start_on(&rt)?;
//! # Ok(()) }
//! ```

use anyhow::{Context, Result};
use aws_config::SdkConfig;
use aws_sdk_iot::Client;
use tokio::runtime::Runtime;

use crate::balena::FakeBalena;
use crate::certs::TestCa;
use crate::foreign::Foreign;
use crate::moto::MotoServer;

/// The current-thread runtime a blocking suite drives its AWS calls with.
#[allow(clippy::expect_used)] // test setup: a machine that cannot build a runtime fails here
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// What a world holds: the parts its suite asked for.
#[derive(Debug)]
pub struct World {
    /// AWS IoT (and DynamoDB, KMS) as moto.
    pub moto: MotoServer,
    /// The SDK configuration for moto (static test credentials, its region).
    pub sdk: SdkConfig,
    /// An AWS IoT client straight to moto, for setup and checks.
    pub client: Client,
    /// The jitr CA, registered in moto (DEFAULT mode, auto-registration on).
    pub ca: TestCa,
    /// Its AWS IoT CA certificate id.
    pub ca_id: String,
    /// The fake balena API with the one fleet, when asked for ([`Spec::balena`]).
    pub balena: Option<FakeBalena>,
    /// Another application's things, when asked for ([`Spec::foreign`]).
    pub foreign: Option<Foreign>,
}

/// What to put in a world.
#[derive(Debug, Clone)]
pub struct Spec {
    ca_name: String,
    policy: Option<String>,
    fleet: Option<(u64, String, String)>,
    foreign: bool,
}

impl Spec {
    /// moto with a jitr CA named `ca_name` registered; nothing else yet.
    pub fn new(ca_name: &str) -> Spec {
        Spec {
            ca_name: ca_name.to_owned(),
            policy: None,
            fleet: None,
            foreign: false,
        }
    }

    /// The device IoT policy `name`, as the stack deploys it.
    pub fn policy(mut self, name: &str) -> Spec {
        self.policy = Some(name.to_owned());
        self
    }

    /// The fake balena API, answering `key`, with fleet `id` (`slug`).
    pub fn balena(mut self, id: u64, slug: &str, key: &str) -> Spec {
        self.fleet = Some((id, slug.to_owned(), key.to_owned()));
        self
    }

    /// Another application's things in the same account ([`Foreign::plant`]), for suites whose
    /// commands can delete or revoke: they assert them untouched at the end.
    pub fn foreign(mut self) -> Spec {
        self.foreign = true;
        self
    }

    /// Starts the world (moto and the fake API on threads of their own).
    pub async fn start(self) -> Result<World> {
        let moto = tokio::task::spawn_blocking(MotoServer::start).await??;
        let sdk = crate::iot::sdk_config(&moto).await;
        let client = Client::new(&sdk);
        let ca = TestCa::new(&self.ca_name)?;
        if let Some(policy) = &self.policy {
            crate::iot::create_policy(&client, policy)
                .await
                .with_context(|| format!("the device policy {policy}"))?;
        }
        let ca_id = crate::iot::register_ca(&client, &ca.cert_pem).await?;
        let foreign = match self.foreign {
            true => Some(Foreign::plant(&moto, &client).await?),
            false => None,
        };
        let balena = match self.fleet {
            Some((id, slug, key)) => {
                let balena = tokio::task::spawn_blocking(move || FakeBalena::start(&key)).await??;
                balena.add_fleet(id, &slug);
                Some(balena)
            }
            None => None,
        };
        Ok(World {
            moto,
            sdk,
            client,
            ca,
            ca_id,
            balena,
            foreign,
        })
    }

    /// [`Spec::start`] for a blocking suite, on its runtime.
    pub fn start_on(self, rt: &Runtime) -> Result<World> {
        rt.block_on(self.start())
    }
}
