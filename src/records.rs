//! The Avro record types on the engine's topics, one struct per schema in
//! `schemas/`. Times are ms since the epoch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    #[serde(with = "scalar_map")]
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub occurred_at: i64,
    /// Consent the source states (`OPT_IN` or `OPT_OUT`), applied by event
    /// time like a keyword; `None` leaves it as it is (a new profile: the
    /// data model's default, `OPT_IN`). Schema v2.
    #[serde(default)]
    pub consent: Option<String>,
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
    pub channel: crate::model::Channel,
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
    pub channel: crate::model::Channel,
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
    #[serde(with = "id")]
    pub message_id: Uuid,
    #[serde(with = "id::optional")]
    pub campaign_id: Option<Uuid>,
    pub recipient: String,
    pub channel: crate::model::Channel,
    pub body: String,
    pub attempt: i32,
    pub kind: crate::model::SendKind,
    pub not_before: Option<i64>,
}

impl Record for SendRequest {
    const KIND: Kind = Kind::SendRequest;
}

/// `consent.changes`: a consent decision that took effect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsentChange {
    pub phone: String,
    pub state: crate::model::ConsentState,
    pub source: String,
    pub keyword: Option<String>,
    pub source_event_id: String,
    pub occurred_at: i64,
    /// The one channel the decision is for (`consent.stop-scope =
    /// "channel"`); `None`: every channel.
    #[serde(default)]
    pub channel: Option<crate::model::Channel>,
}

impl Record for ConsentChange {
    const KIND: Kind = Kind::ConsentChange;
}

/// `campaigns.commands`: a campaign transition, keyed by campaign id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignCommand {
    pub command_id: String,
    #[serde(with = "id")]
    pub campaign_id: Uuid,
    pub command: crate::model::CampaignAction,
    pub status: crate::model::CampaignStatus,
    pub issued_by: String,
    pub issued_at: i64,
}

impl Record for CampaignCommand {
    const KIND: Kind = Kind::CampaignCommand;
}

/// The ids of campaigns and messages in records: a UUID as its canonical
/// text (schema v2: `["string", "long"]`). A `long` is a v1 record's id,
/// from before the ids became UUIDs (migration V15), and reads as the UUID
/// that row was given: [`legacy_uuid`].
pub mod id {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Legacy(i64),
        }
        match Either::deserialize(d)? {
            Either::Text(t) => Uuid::parse_str(&t)
                .map_err(|e| serde::de::Error::custom(format!("id {t:?} is not a UUID: {e}"))),
            Either::Legacy(n) => Ok(super::legacy_uuid(n)),
        }
    }

    /// The same for an optional id.
    pub mod optional {
        use super::*;

        pub fn serialize<S: Serializer>(id: &Option<Uuid>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.serialize_some(&id.to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Uuid);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// The UUID an id of before migrations V14/V15 was given: SQL's
/// `ese_legacy_uuid(id)`, `00000000-0000-8000-8000-` and the number in 12
/// hex digits (version 8).
pub fn legacy_uuid(id: i64) -> Uuid {
    Uuid::from_u64_pair(0x8000, (1 << 63) | (id as u64 & 0xFFFF_FFFF_FFFF))
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

/// The record types the engine reads and writes; each has a schema file per version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    UserUpsert,
    WebhookRaw,
    ReceiptNormalized,
    InboundNormalized,
    SendRequest,
    ConsentChange,
    CampaignCommand,
}

impl Kind {
    /// Every version's schema text, oldest first; the last is the one written.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::UserUpsert => &[
                include_str!("../schemas/user_upsert.v1.avsc"),
                include_str!("../schemas/user_upsert.v2.avsc"),
            ],
            Kind::WebhookRaw => &[include_str!("../schemas/webhook_raw.v1.avsc")],
            Kind::ReceiptNormalized => &[include_str!("../schemas/receipt_normalized.v1.avsc")],
            Kind::InboundNormalized => &[include_str!("../schemas/inbound_normalized.v1.avsc")],
            Kind::SendRequest => &[
                include_str!("../schemas/send_request.v1.avsc"),
                include_str!("../schemas/send_request.v2.avsc"),
            ],
            Kind::ConsentChange => &[
                include_str!("../schemas/consent_change.v1.avsc"),
                include_str!("../schemas/consent_change.v2.avsc"),
            ],
            Kind::CampaignCommand => &[
                include_str!("../schemas/campaign_command.v1.avsc"),
                include_str!("../schemas/campaign_command.v2.avsc"),
            ],
        }
    }

    pub const ALL: &'static [Kind] = &[
        Kind::UserUpsert,
        Kind::WebhookRaw,
        Kind::ReceiptNormalized,
        Kind::InboundNormalized,
        Kind::SendRequest,
        Kind::ConsentChange,
        Kind::CampaignCommand,
    ];

    /// The record type on the topic named `key` in `[topics]`; `None` for
    /// dead-letter topics, which carry their source topic's records as they were.
    pub fn of_topic(key: &str) -> Option<Kind> {
        Some(match key {
            "users" => Kind::UserUpsert,
            "webhooks-status" | "webhooks-inbound" => Kind::WebhookRaw,
            "receipts" => Kind::ReceiptNormalized,
            "inbound" => Kind::InboundNormalized,
            "consent-changes" => Kind::ConsentChange,
            "campaign-commands" => Kind::CampaignCommand,
            k if k == "sends" || k.starts_with("sends-retry-") => Kind::SendRequest,
            _ => return None,
        })
    }

    /// The schema written now (the newest version).
    pub fn current(self) -> &'static str {
        self.versions().last().copied().unwrap_or_default()
    }
}

/// Serde adapter for `map<union{null, boolean, long, double, string}>` fields
/// held as JSON values: integers go out as Avro `long` (serde_json would send
/// a non-negative one as `u64`, which Avro has no type for), other numbers as
/// `double`; arrays and objects are refused with the key's name.
pub mod scalar_map {
    use std::collections::BTreeMap;

    use serde::ser::{Error, SerializeMap};
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Value>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            match v {
                Value::Null => m.serialize_entry(k, &Option::<i64>::None)?,
                Value::Bool(b) => m.serialize_entry(k, b)?,
                Value::Number(n) => match n.as_i64() {
                    Some(i) => m.serialize_entry(k, &i)?,
                    None => m.serialize_entry(k, &n.as_f64().unwrap_or(f64::NAN))?,
                },
                Value::String(t) => m.serialize_entry(k, t)?,
                Value::Array(_) | Value::Object(_) => {
                    return Err(S::Error::custom(format!(
                        "attribute {k:?}: values must be null, boolean, number or string"
                    )));
                }
            }
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Value>, D::Error> {
        BTreeMap::<String, Value>::deserialize(d)
    }
}
