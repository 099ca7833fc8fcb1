//! Event Stream Engine: a Kafka stream-processing pipeline for a WhatsApp/SMS
//! messaging platform, with PostgreSQL as the sink of record.
//!
//! Modules:
//! - [`cli`]: the `ese` command line; `main.rs` only calls [`cli::main`].
//! - [`config`]: settings from `config/default.toml`, `pipelines/*.toml`, a file and the environment.
//! - [`db`]: the Postgres pool, migrations (`migrations/`), error classification.
//! - [`http`]: the one place HTTP clients are built.
//! - [`kafka`]: the one place Kafka clients are configured; topic creation.
//! - [`bridge`]: the webhook bridge (axum): provider callbacks → Kafka, probes, metrics.
//! - [`broker`]: the embedded Kafka-API broker (tansu) for development and tests.
//! - [`codec`]: Avro records (`schemas/`), single-object or schema-registry encoded.
//! - [`records`]: the record types on the topics, one per schema.
//! - [`campaigns`]: templates, segment filters, the campaign state machine, the admin API, the scheduler.
//! - [`reports`]: read-side queries (campaign performance, dashboard figures).
//! - [`runner`]: the stage runner — the one consumer loop every stage uses.
//! - [`stages`]: the stages (domain logic and SQL only), registered by name.
//! - [`sim`]: the Twilio-compatible provider simulator (`ese provider-sim`).
//! - [`phone`]: E.164 normalization.
//! - [`metrics`]: the Prometheus recorder and `/metrics`.
//! - [`bench`]: `ese bench …`, throughput with its ceilings measured in the same run.
//! - [`engine`]: wiring a process together (`ese up`, `ese run`).

pub mod bench;
pub mod bridge;
pub mod broker;
pub mod campaigns;
pub mod cli;
pub mod codec;
pub mod config;
pub mod db;
pub mod demo;
pub mod engine;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod phone;
pub mod records;
pub mod reports;
pub mod runner;
pub mod sim;
pub mod stages;
