//! The Avro record types on the engine's topics, one struct per schema in
//! `schemas/`. Times are ms since the epoch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::Kind;

/// Ties a record type to its schema.
pub trait Record: Serialize + serde::de::DeserializeOwned {
    const KIND: Kind;
}

/// `users.upserts`: a profile upsert from a producer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserUpsert {
    pub event_id: Option<String>,
    /// As typed by a person or system; normalized by the users stage.
    pub phone: String,
    #[serde(with = "crate::codec::scalar_map")]
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub occurred_at: i64,
}

impl Record for UserUpsert {
    const KIND: Kind = Kind::UserUpsert;
}

/// One form parameter as sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub value: String,
}

/// `webhooks.*.raw`: a provider webhook exactly as received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookRaw {
    pub event_id: String,
    /// `status` or `inbound`.
    pub kind: String,
    pub path: String,
    pub query: String,
    pub params: Vec<Param>,
    pub body: Option<String>,
    pub content_type: String,
    pub received_at: i64,
}

impl Record for WebhookRaw {
    const KIND: Kind = Kind::WebhookRaw;
}

impl WebhookRaw {
    /// The first value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }

    /// Every parameter as a JSON object (a repeated name becomes an array).
    pub fn params_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for p in &self.params {
            let v = serde_json::Value::String(p.value.clone());
            match map.get_mut(&p.name) {
                None => {
                    map.insert(p.name.clone(), v);
                }
                Some(serde_json::Value::Array(a)) => a.push(v),
                Some(existing) => {
                    let first = existing.take();
                    *existing = serde_json::Value::Array(vec![first, v]);
                }
            }
        }
        serde_json::Value::Object(map)
    }
}

/// `receipts.normalized`: a status callback in the engine's vocabulary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiptNormalized {
    pub event_id: String,
    pub message_sid: String,
    pub status: String,
    pub error_code: Option<i32>,
    pub channel: String,
    pub recipient: Option<String>,
    pub received_at: i64,
}

impl Record for ReceiptNormalized {
    const KIND: Kind = Kind::ReceiptNormalized;
}

/// `inbound.normalized`: an inbound message from an E.164 number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InboundNormalized {
    pub event_id: String,
    pub message_sid: String,
    pub from: String,
    pub to: String,
    pub channel: String,
    pub body: String,
    pub profile_name: Option<String>,
    pub wa_id: Option<String>,
    pub num_media: i32,
    pub received_at: i64,
}

impl Record for InboundNormalized {
    const KIND: Kind = Kind::InboundNormalized;
}

/// `sends` (and the retry topics): a message for the sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SendRequest {
    pub message_id: i64,
    pub campaign_id: Option<i64>,
    pub recipient: String,
    pub channel: String,
    pub body: String,
    pub attempt: i32,
    /// `campaign`, `reply` or `opt_out_confirmation`.
    pub kind: String,
    pub not_before: Option<i64>,
}

impl Record for SendRequest {
    const KIND: Kind = Kind::SendRequest;
}

/// `consent.changes`: a consent decision that took effect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsentChange {
    pub phone: String,
    pub state: String,
    pub source: String,
    pub keyword: Option<String>,
    pub source_event_id: String,
    pub occurred_at: i64,
}

impl Record for ConsentChange {
    const KIND: Kind = Kind::ConsentChange;
}

/// `campaigns.commands`: a campaign transition, keyed by campaign id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignCommand {
    pub command_id: String,
    pub campaign_id: i64,
    pub command: String,
    pub status: String,
    pub issued_by: String,
    pub issued_at: i64,
}

impl Record for CampaignCommand {
    const KIND: Kind = Kind::CampaignCommand;
}
