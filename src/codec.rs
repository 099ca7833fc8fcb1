//! Avro records with the schemas in `schemas/`.
//!
//! Without a schema registry every record is Avro single-object encoded
//! (`C3 01`, the 8-byte CRC-64-AVRO fingerprint of the writer schema, then the
//! datum); every version of every schema is known, so a record written with an
//! older version is read through schema resolution. With `schema-registry.url`
//! set, records use the Confluent wire format via `schema_registry_converter`
//! (topic-name subject strategy; the schema is registered on first use).

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Schema, from_value, to_value};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use crate::records::{Kind, Record};

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("not Avro single-object encoded (missing C3 01 marker)")]
    NotSingleObject,
    #[error("unknown schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("avro: {0}")]
    Avro(String),
    /// The registry could not be asked (unreachable, 5xx): worth retrying.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The registry refused this client (401/403): no record can be read or
    /// written until the configuration is fixed.
    #[error("schema registry refused the request: {0}")]
    RegistryRefused(String),
    /// A Confluent-framed record where no registry is configured.
    #[error("Confluent-framed record (schema id {0}) but no schema-registry.url is configured")]
    NoRegistry(u32),
}

impl CodecError {
    /// Sorts a registry error by what the caller should do about it.
    fn from_registry(e: schema_registry_converter::error::SRCError) -> Self {
        let text = match &e.cause {
            Some(cause) => format!("{}: {cause}", e.error),
            None => e.error.clone(),
        };
        if e.error.contains("status 401") || e.error.contains("status 403") {
            CodecError::RegistryRefused(text)
        } else if e.retriable || e.error.contains("status 5") {
            CodecError::Registry(text)
        } else {
            CodecError::Avro(format!("schema registry: {text}"))
        }
    }
}

/// Where the registry password comes from: the environment only.
pub const REGISTRY_PASSWORD_ENV: &str = "SCHEMA_REGISTRY_PASSWORD";

/// The schemas of one kind. Schemas are leaked once at start (a handful of
/// small values) so readers and writers can be resolved once and reused.
struct Known {
    current: &'static Schema,
    writer: GenericDatumWriter<'static>,
    /// fingerprint → reader from that writer version to the current schema
    readers: HashMap<u64, GenericDatumReader<'static>>,
    /// The current schema's fingerprints: [the spec's, the legacy one].
    /// Records are written with the spec's.
    current_fingerprints: [u64; 2],
    text: &'static str,
    /// Whether serde maps straight onto the current schema ([`direct_serde`]).
    direct: bool,
}

/// True when every union in `schema` is `["null", T]`, the only unions
/// apache-avro's schema-aware serializer and deserializer handle; such kinds
/// skip the intermediate `Value` tree (building, resolving and validating it
/// was a quarter of the normalize stage's codec time).
fn direct_serde(schema: &Schema) -> bool {
    match schema {
        Schema::Union(u) => {
            u.variants().len() == 2
                && matches!(u.variants()[0], Schema::Null)
                && direct_serde(&u.variants()[1])
        }
        Schema::Record(r) => r.fields.iter().all(|f| direct_serde(&f.schema)),
        Schema::Map(m) => direct_serde(&m.types),
        Schema::Array(a) => direct_serde(&a.items),
        _ => true,
    }
}

/// Encodes and decodes every record type; cheap to clone.
#[derive(Clone)]
pub struct Codec {
    known: Arc<HashMap<Kind, Known>>,
    registry: Option<Arc<(AvroEncoder, AvroDecoder)>>,
}

/// apache-avro's CRC-64-AVRO fingerprint of `schema`'s canonical form.
fn fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut b = [0u8; 8];
    b.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(b)
}

/// A schema's fingerprints: [the Avro spec's, the one this engine wrote
/// before]. apache-avro's canonical form keeps a primitive with a
/// `logicalType` as `{"type":"long"}` where the spec's Parsing Canonical
/// Form has `"long"`, so other languages' libraries (Java's
/// `SchemaNormalization`, fastavro) compute another fingerprint. The spec's
/// is apache-avro's over the schema without its logical types.
fn fingerprints(text: &str, schema: &Schema) -> anyhow::Result<[u64; 2]> {
    fn plain(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("logicalType");
                if m.len() == 1
                    && let Some(t @ serde_json::Value::String(_)) = m.get("type")
                {
                    *v = t.clone();
                    return;
                }
                m.values_mut().for_each(plain);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(plain),
            _ => {}
        }
    }
    let mut json: serde_json::Value = serde_json::from_str(text)?;
    plain(&mut json);
    let spec = Schema::parse(&json)?;
    Ok([fingerprint(&spec), fingerprint(schema)])
}

impl Codec {
    /// Single-object encoding, no registry.
    pub fn single_object() -> anyhow::Result<Self> {
        Self::new(&crate::config::RegistryConfig::default())
    }

    /// Loads the embedded schemas; an empty `registry.url` means
    /// single-object encoding.
    pub fn new(registry: &crate::config::RegistryConfig) -> anyhow::Result<Self> {
        let mut known = HashMap::new();
        for &kind in Kind::ALL {
            let mut versions: Vec<(&'static Schema, [u64; 2])> = Vec::new();
            for text in kind.versions() {
                let schema = Schema::parse_str(text)
                    .map_err(|e| anyhow::anyhow!("schema for {kind:?} does not parse: {e}"))?;
                let fps = fingerprints(text, &schema)
                    .map_err(|e| anyhow::anyhow!("schema for {kind:?}: {e}"))?;
                versions.push((Box::leak(Box::new(schema)), fps));
            }
            let text = kind
                .versions()
                .last()
                .ok_or_else(|| anyhow::anyhow!("no schema for {kind:?}"))?;
            let (current, current_fingerprints) = versions[versions.len() - 1];
            let mut readers = HashMap::new();
            for (writer, fps) in versions {
                for fp in fps {
                    // Records written with the current schema need no resolution
                    // (resolving every value was ~13% of the normalize stage's CPU).
                    let builder = GenericDatumReader::builder(writer);
                    let reader = if fps == current_fingerprints {
                        builder.build()
                    } else {
                        builder.reader_schema(current).build()
                    }
                    .map_err(|e| anyhow::anyhow!("schema for {kind:?} does not resolve: {e}"))?;
                    readers.insert(fp, reader);
                }
            }
            let writer = GenericDatumWriter::builder(current)
                .build()
                .map_err(|e| anyhow::anyhow!("schema for {kind:?}: {e}"))?;
            known.insert(
                kind,
                Known {
                    current,
                    writer,
                    readers,
                    current_fingerprints,
                    text,
                    direct: direct_serde(current),
                },
            );
        }
        let registry = registry_settings(registry)?.map(|settings| {
            Arc::new((
                AvroEncoder::new(settings.clone()),
                AvroDecoder::new(settings),
            ))
        });
        Ok(Self {
            known: Arc::new(known),
            registry,
        })
    }

    fn known(&self, kind: Kind) -> &Known {
        // Every Kind is loaded in `new`, which fails otherwise.
        &self.known[&kind]
    }

    /// Encodes `item` as a `kind` record bound for `topic`.
    pub async fn encode<R: Record>(&self, topic: &str, item: &R) -> Result<Vec<u8>, CodecError> {
        let known = self.known(R::KIND);
        let avro = |e: apache_avro::Error| CodecError::Avro(e.to_string());
        let value = || {
            to_value(item)
                .and_then(|v| v.resolve(known.current))
                .map_err(avro)
        };
        match &self.registry {
            None => {
                let mut out = Vec::with_capacity(128);
                out.extend_from_slice(&[0xC3, 0x01]);
                out.extend_from_slice(&known.current_fingerprints[0].to_le_bytes());
                if known.direct {
                    known.writer.write_ser(&mut out, item).map_err(avro)?;
                } else {
                    known.writer.write_value(&mut out, value()?).map_err(avro)?;
                }
                Ok(out)
            }
            Some(reg) => {
                let value = value()?;
                let supplied = SuppliedSchema::new(None, SchemaType::Avro, known.text.to_string());
                let strategy =
                    SubjectNameStrategy::TopicNameStrategyWithSchema(topic.into(), false, supplied);
                reg.0
                    .encode_value(value, &strategy)
                    .await
                    .map_err(CodecError::from_registry)
            }
        }
    }

    /// Any record this codec can read, as JSON with its type name, for
    /// people (dead-letter listings); None when no known schema reads it.
    pub async fn describe(&self, bytes: &[u8]) -> Option<(String, serde_json::Value)> {
        let value = match (&self.registry, framing(bytes)) {
            (_, Framing::SingleObject) => {
                let fp = u64::from_le_bytes(bytes[2..10].try_into().ok()?);
                self.known.iter().find_map(|(kind, known)| {
                    let mut body = &bytes[10..];
                    let value = known.readers.get(&fp)?.read_value(&mut body).ok()?;
                    Some((format!("{kind:?}"), value))
                })?
            }
            (None, _) | (_, Framing::Unknown) => return None,
            (Some(reg), Framing::Confluent(_)) => {
                let decoded = reg.1.decode(Some(bytes)).await.ok()?;
                let name = match &decoded.name {
                    Some(n) => n.name().to_string(),
                    None => "record".to_string(),
                };
                (name, decoded.value)
            }
        };
        Some((value.0, serde_json::Value::try_from(value.1).ok()?))
    }

    /// Decodes a `kind` record written with any known version of its schema.
    pub async fn decode<R: Record>(&self, bytes: &[u8]) -> Result<R, CodecError> {
        if bytes.is_empty() {
            return Err(CodecError::Empty);
        }
        let known = self.known(R::KIND);
        // Either wire format is read whatever this codec writes, so
        // producers in other languages may use either.
        let value: Value = match (&self.registry, framing(bytes)) {
            (_, Framing::Unknown) => return Err(CodecError::NotSingleObject),
            (None, Framing::Confluent(id)) => return Err(CodecError::NoRegistry(id)),
            (_, Framing::SingleObject) => {
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&bytes[2..10]);
                let fp = u64::from_le_bytes(fp);
                let reader = known
                    .readers
                    .get(&fp)
                    .ok_or(CodecError::UnknownFingerprint(fp))?;
                let mut body = &bytes[10..];
                let trailing = |body: &[u8]| {
                    CodecError::Avro(format!("{} trailing bytes after the record", body.len()))
                };
                if known.current_fingerprints.contains(&fp) && known.direct {
                    // The current schema needs no resolution: deserialize
                    // straight into the struct, no Value tree.
                    let record = reader
                        .read_deser::<R>(&mut body)
                        .map_err(|e| CodecError::Avro(e.to_string()))?;
                    return if body.is_empty() {
                        Ok(record)
                    } else {
                        Err(trailing(body))
                    };
                }
                let value = reader
                    .read_value(&mut body)
                    .map_err(|e| CodecError::Avro(e.to_string()))?;
                if !body.is_empty() {
                    return Err(trailing(body));
                }
                value
            }
            (Some(reg), Framing::Confluent(_)) => match reg.1.decode(Some(bytes)).await {
                Ok(decoded) => decoded.value,
                Err(e) => {
                    // The decoder caches failures; a retry must ask again.
                    reg.1.remove_errors_from_cache();
                    return Err(CodecError::from_registry(e));
                }
            },
        };
        from_value::<R>(&value).map_err(|e| CodecError::Avro(e.to_string()))
    }
}

/// The two wire formats a record may come in.
enum Framing {
    /// `C3 01`, 8-byte schema fingerprint, datum.
    SingleObject,
    /// `00`, 4-byte big-endian registry schema id, datum.
    Confluent(u32),
    Unknown,
}

fn framing(bytes: &[u8]) -> Framing {
    match bytes {
        [0xC3, 0x01, _, _, _, _, _, _, _, _, ..] => Framing::SingleObject,
        [0x00, a, b, c, d, ..] => Framing::Confluent(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Framing::Unknown,
    }
}

/// The converter's settings for `registry`, None when no URL is set.
fn registry_settings(
    registry: &crate::config::RegistryConfig,
) -> anyhow::Result<Option<SrSettings>> {
    let url = registry.url.trim().trim_end_matches('/');
    if url.is_empty() {
        return Ok(None);
    }
    crate::http::install_crypto();
    let mut builder = SrSettings::new_builder(url.to_string());
    if !registry.username.is_empty() {
        let password = std::env::var(REGISTRY_PASSWORD_ENV).ok();
        builder.set_basic_authorization(&registry.username, password.as_deref());
    }
    builder
        .set_timeout(std::time::Duration::from_secs(10))
        .build()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("schema-registry: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::UserUpsert;

    #[tokio::test]
    async fn single_object_round_trip() {
        let codec = Codec::single_object().unwrap();
        let u = UserUpsert {
            consent: None,
            event_id: None,
            phone: "+14155550100".into(),
            attributes: [
                ("city".to_string(), serde_json::json!("Paris")),
                ("age".to_string(), serde_json::json!(41)),
                ("vip".to_string(), serde_json::json!(true)),
                ("score".to_string(), serde_json::json!(2.5)),
                ("gone".to_string(), serde_json::Value::Null),
            ]
            .into(),
            occurred_at: 1_700_000_000_000,
        };
        let bytes = codec.encode("t", &u).await.unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        let back: UserUpsert = codec.decode(&bytes).await.unwrap();
        assert_eq!(back, u);
    }

    /// Kinds encoded straight from serde write the same bytes the `Value`
    /// path writes, so readers of either kind of record never differ.
    #[tokio::test]
    async fn direct_encoding_matches_the_value_path() {
        use crate::records::{Param, ReceiptNormalized, WebhookRaw};
        let codec = Codec::single_object().unwrap();
        let receipt = ReceiptNormalized {
            event_id: "e1".into(),
            message_sid: "SM1".into(),
            status: "delivered".into(),
            error_code: Some(30003),
            channel: crate::model::Channel::Sms,
            recipient: None,
            received_at: 1_700_000_000_000,
        };
        let raw = WebhookRaw {
            event_id: "e2".into(),
            kind: "status".into(),
            path: "/webhooks/twilio/status".into(),
            query: String::new(),
            params: vec![Param {
                name: "MessageSid".into(),
                value: "SM1".into(),
            }],
            body: Some("{}".into()),
            content_type: "application/x-www-form-urlencoded".into(),
            received_at: 1_700_000_000_000,
        };
        async fn check<R: Record + PartialEq + std::fmt::Debug>(codec: &Codec, r: &R) {
            let known = codec.known(R::KIND);
            assert!(known.direct, "{:?} should encode directly", R::KIND);
            let bytes = codec.encode("t", r).await.unwrap();
            let value = to_value(r).unwrap().resolve(known.current).unwrap();
            let body = known.writer.write_value_to_vec(value).unwrap();
            assert_eq!(&bytes[10..], &body[..]);
            let back: R = codec.decode(&bytes).await.unwrap();
            assert_eq!(&back, r);
        }
        check(&codec, &receipt).await;
        check(&codec, &raw).await;
    }

    #[tokio::test]
    async fn nested_attribute_is_refused_with_its_name() {
        let codec = Codec::single_object().unwrap();
        let u = UserUpsert {
            consent: None,
            event_id: None,
            phone: "+14155550100".into(),
            attributes: [("tags".to_string(), serde_json::json!(["a"]))].into(),
            occurred_at: 0,
        };
        let err = codec.encode("t", &u).await.unwrap_err().to_string();
        assert!(err.contains("tags"), "{err}");
    }

    /// The spec's fingerprint, as Java's SchemaNormalization and fastavro
    /// compute it (`fingerprint(to_parsing_canonical_form(parse_schema(s)),
    /// "CRC-64-AVRO")` gives `a0a420afb7b00156` for UserUpsert v2), is what
    /// records carry; the legacy one is still read, and so is a v1 record.
    #[tokio::test]
    async fn fingerprints_follow_the_spec_and_the_old_ones_still_read() {
        let codec = Codec::single_object().unwrap();
        let u = UserUpsert {
            consent: None,
            event_id: None,
            phone: "+14155550100".into(),
            attributes: Default::default(),
            occurred_at: 1,
        };
        let bytes = codec.encode("t", &u).await.unwrap();
        assert_eq!(hex(&bytes[2..10]), "a0a420afb7b00156");
        let legacy = codec.known(Kind::UserUpsert).current_fingerprints[1];
        let mut old = bytes.clone();
        old[2..10].copy_from_slice(&legacy.to_le_bytes());
        assert_eq!(codec.decode::<UserUpsert>(&old).await.unwrap(), u);
        // v1 (fingerprint 589b200c3773fa75): the same datum without the
        // trailing `consent` union (one byte, null).
        let mut v1 = bytes[..bytes.len() - 1].to_vec();
        v1[2..10].copy_from_slice(&0x75fa73370c209b58u64.to_le_bytes());
        assert_eq!(hex(&v1[2..10]), "589b200c3773fa75");
        assert_eq!(codec.decode::<UserUpsert>(&v1).await.unwrap(), u);
    }

    /// Ids are UUIDs since schema v2 of sends and campaign commands; a v1
    /// record still on a topic at the upgrade (a `long` id) reads as the
    /// UUID migration V15 gave that row, and v2 is BACKWARD compatible.
    #[tokio::test]
    async fn uuid_ids_round_trip_and_a_v1_long_id_reads_as_its_legacy_uuid() {
        use crate::records::{CampaignCommand, SendRequest, legacy_uuid};
        use apache_avro::schema_compatibility::SchemaCompatibility;
        let codec = Codec::single_object().unwrap();
        let send = SendRequest {
            message_id: uuid::Uuid::now_v7(),
            campaign_id: Some(uuid::Uuid::now_v7()),
            recipient: "+14155550100".into(),
            channel: crate::model::Channel::Sms,
            body: "hi".into(),
            attempt: 1,
            kind: crate::model::SendKind::Campaign,
            not_before: Some(5),
        };
        let bytes = codec.encode("t", &send).await.unwrap();
        assert_eq!(codec.decode::<SendRequest>(&bytes).await.unwrap(), send);
        let none = SendRequest {
            campaign_id: None,
            ..send.clone()
        };
        let bytes = codec.encode("t", &none).await.unwrap();
        assert_eq!(codec.decode::<SendRequest>(&bytes).await.unwrap(), none);

        for kind in [Kind::SendRequest, Kind::CampaignCommand] {
            let [v1, v2] = kind.versions() else {
                panic!("{kind:?}: two versions")
            };
            let (v1, v2) = (
                Schema::parse_str(v1).unwrap(),
                Schema::parse_str(v2).unwrap(),
            );
            SchemaCompatibility::can_read(&v1, &v2).unwrap();
            // A v1 record: written with v1, framed with its fingerprint.
            let mut record = apache_avro::types::Record::new(&v1).unwrap();
            let fields: &[(&str, Value)] = match kind {
                Kind::SendRequest => &[
                    ("message_id", Value::Long(42)),
                    ("campaign_id", Value::Union(1, Box::new(Value::Long(7)))),
                    ("recipient", Value::String("+14155550100".into())),
                    ("channel", Value::String("SMS".into())),
                    ("body", Value::String("hi".into())),
                    ("attempt", Value::Int(0)),
                    ("kind", Value::String("campaign".into())),
                    ("not_before", Value::Union(0, Box::new(Value::Null))),
                ],
                _ => &[
                    ("command_id", Value::String("c".into())),
                    ("campaign_id", Value::Long(7)),
                    ("command", Value::String("start".into())),
                    ("status", Value::String("RUNNING".into())),
                    ("issued_by", Value::String("api".into())),
                    ("issued_at", Value::TimestampMillis(1)),
                ],
            };
            for (name, value) in fields {
                record.put(name, value.clone());
            }
            let mut framed = vec![0xC3, 0x01];
            framed.extend_from_slice(
                &fingerprints(kind.versions()[0], &v1).unwrap()[0].to_le_bytes(),
            );
            GenericDatumWriter::builder(&v1)
                .build()
                .unwrap()
                .write_value(&mut framed, Value::from(record))
                .unwrap();
            match kind {
                Kind::SendRequest => {
                    let s: SendRequest = codec.decode(&framed).await.unwrap();
                    assert_eq!(s.message_id, legacy_uuid(42));
                    assert_eq!(s.campaign_id, Some(legacy_uuid(7)));
                }
                _ => {
                    let c: CampaignCommand = codec.decode(&framed).await.unwrap();
                    assert_eq!(c.campaign_id, legacy_uuid(7));
                }
            }
        }
        assert_eq!(
            legacy_uuid(42).to_string(),
            "00000000-0000-8000-8000-00000000002a",
            "as SQL's ese_legacy_uuid(42)"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let codec = Codec::single_object().unwrap();
        for bad in [&b""[..], b"hello", &[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 1]] {
            assert!(codec.decode::<UserUpsert>(bad).await.is_err());
        }
    }
}
