//! Integration tests: real PostgreSQL (a fresh database per test) and a real
//! Kafka-API broker (the embedded one, or `KAFKA_BROKERS`), every client over TCP.
//! `apache::` needs Apache Kafka's three-broker cluster of `scripts/kafka`
//! (started when not running): `scripts/test` runs it on its own, after the rest.

mod apache;
mod bridge;
mod campaigns;
mod deploy;
mod examples;
mod fixtures;
mod harness;
mod hostile;
mod kafka;
mod lifecycle;
mod migrations;
mod observability;
mod ops;
mod postgres_tls;
mod receipts_consent;
mod reliability;
mod reports;
mod sender;
mod single_node;
mod users;
mod whatsapp;
