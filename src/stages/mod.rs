//! The stages, in one registry. A stage is a folder (or file) here with a
//! [`crate::runner::Stage`] and a `start` function, its
//! `pipelines/<name>.toml`, and one row of [`REGISTRY`]; the runner does
//! the rest. To add one:
//!
//! 1. `src/stages/<name>/mod.rs`: a struct implementing `Stage` (its
//!    `Input` record type and `process`), and
//!    `pub fn start(deps: Deps, shutdown) -> BoxFuture<…>` that builds it and
//!    calls `deps.consume("<name>", stage, shutdown)`;
//! 2. `pipelines/<name>.toml`: group id, inputs, outputs and DLQ by
//!    `[topics]` key, batch size, concurrency (embedded by `build.rs`);
//! 3. a row below.

pub mod consent;
pub mod fanout;
pub mod normalize;
pub mod receipts;
pub mod sender;
pub mod users;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::runner::Deps;

/// Builds a stage from the process's shared clients and runs it until
/// shutdown (clean) or a fatal error.
pub type Start = fn(Deps, CancellationToken) -> BoxFuture<'static, anyhow::Result<()>>;

/// One stage `ese run` knows.
pub struct Def {
    pub name: &'static str,
    pub start: Start,
}

/// Every stage, in pipeline order. `scheduler` is not a consumer (it has no
/// pipeline) but runs the same way.
pub const REGISTRY: &[Def] = &[
    Def {
        name: "users",
        start: users::start,
    },
    Def {
        name: "normalize",
        start: normalize::start,
    },
    Def {
        name: "consent",
        start: consent::start,
    },
    Def {
        name: "receipts",
        start: receipts::start,
    },
    Def {
        name: "fanout",
        start: fanout::start,
    },
    Def {
        name: "sender",
        start: sender::start,
    },
    Def {
        name: "scheduler",
        start: crate::campaigns::scheduler::start,
    },
];

/// Every stage's name, in pipeline order.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|d| d.name).collect()
}

/// Runs stage `name` until `shutdown` (clean) or a fatal error.
pub async fn run(name: &str, deps: Deps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let def = REGISTRY
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| anyhow::anyhow!("unknown stage {name:?}; stages: {}", names().join(", ")))?;
    (def.start)(deps, shutdown).await
}

/// Produces `sends` on `topic`, keyed by recipient, and waits for every
/// acknowledgement (fan-out pages, held messages put back).
pub async fn produce_sends(
    producer: &crate::kafka::Producer,
    codec: &Codec,
    topic: &str,
    sends: &[crate::records::SendRequest],
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut payloads = Vec::with_capacity(sends.len());
    for s in sends {
        payloads.push(codec.encode(topic, s).await?);
    }
    let records = sends
        .iter()
        .zip(&payloads)
        .map(|(s, p)| {
            rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic)
                .key(s.recipient.as_bytes())
                .payload(p.as_slice())
        })
        .collect();
    producer
        .send_all(records, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("producing {} send records on {topic}: {e}", sends.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every consumer stage has its pipeline, every pipeline its stage.
    #[test]
    fn registry_and_pipelines_agree() {
        let settings = crate::config::Settings::load(None).expect("defaults load");
        for name in settings.pipelines.keys() {
            assert!(
                names().contains(&name.as_str()),
                "pipelines/{name}.toml has no stage"
            );
        }
        for name in names() {
            assert!(
                name == "scheduler" || settings.pipelines.contains_key(name),
                "stage {name} has no pipelines/{name}.toml"
            );
        }
    }
}
