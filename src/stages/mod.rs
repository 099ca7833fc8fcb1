//! The stages, registered by name. Each is a [`crate::runner::Stage`]; the
//! runner does the rest.

pub mod users;

use std::sync::Arc;

use deadpool_postgres::Pool;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::Settings;
use crate::phone::Normalizer;
use crate::runner;

/// Every stage `ese run` knows, in pipeline order.
pub const ALL: &[&str] = &["users"];

/// What a stage is built from.
#[derive(Clone)]
pub struct Deps {
    pub settings: Settings,
    pub pool: Pool,
    pub producer: FutureProducer,
    pub codec: Codec,
}

/// Runs stage `name` until `shutdown` (clean) or a fatal error.
pub async fn run(name: &str, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pipeline = deps.settings.pipeline(name)?.clone();
    let phones = Normalizer::new(&deps.settings.phone.default_region);
    let kafka = &deps.settings.kafka;
    match name {
        "users" => {
            let stage = users::Users {
                codec: deps.codec.clone(),
                phones,
            };
            runner::run(
                Arc::new(stage),
                pipeline,
                kafka,
                deps.pool,
                deps.producer,
                shutdown,
            )
            .await
        }
        other => anyhow::bail!("unknown stage {other:?}; stages: {}", ALL.join(", ")),
    }
}
