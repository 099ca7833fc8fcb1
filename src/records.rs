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

/// Parameters as a JSON object, a repeated name becoming an array of its
/// values in order. Serialized straight into a `json`/`jsonb` query parameter
/// (the audit trail's `raw_payload`) without building a `serde_json::Value`.
#[derive(Debug, Clone, Copy)]
pub struct ParamsJson<'a>(pub &'a [Param]);

impl Serialize for ParamsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // Grouped by name (stable, so values keep their order); key order is
        // immaterial to JSON objects.
        let mut sorted: Vec<&Param> = self.0.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut map = s.serialize_map(None)?;
        for group in sorted.chunk_by(|a, b| a.name == b.name) {
            match group {
                [one] => map.serialize_entry(&one.name, &one.value)?,
                many => {
                    let values: Vec<&str> = many.iter().map(|p| p.value.as_str()).collect();
                    map.serialize_entry(&many[0].name, &values)?
                }
            }
        }
        map.end()
    }
}

impl tokio_postgres::types::ToSql for ParamsJson<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        if *ty == tokio_postgres::types::Type::JSONB {
            out.put_u8(1); // jsonb binary format version
        }
        serde_json::to_writer(out.writer(), self)?;
        Ok(tokio_postgres::types::IsNull::No)
    }

    tokio_postgres::types::accepts!(JSON, JSONB);
    tokio_postgres::types::to_sql_checked!();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_become_an_object_with_repeated_names_as_arrays() {
        let params: Vec<Param> = [
            ("To", "+14155550100"),
            ("MediaUrl", "https://a"),
            ("Body", "say \"hi\"\n"),
            ("MediaUrl", "https://b"),
        ]
        .iter()
        .map(|(n, v)| Param {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect();
        let text = serde_json::to_string(&ParamsJson(&params)).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({
                "To": "+14155550100",
                "MediaUrl": ["https://a", "https://b"],
                "Body": "say \"hi\"\n",
            })
        );
    }
}
