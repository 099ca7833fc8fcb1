//! Integration tests: real PostgreSQL (a fresh database per test) and a real
//! Kafka-API broker (the embedded one, or `KAFKA_BROKERS`), every client over TCP.

mod bridge;
mod campaigns;
mod deploy;
mod fixtures;
mod harness;
mod hostile;
mod kafka;
mod migrations;
mod ops;
mod receipts_consent;
mod reliability;
mod sender;
mod users;
