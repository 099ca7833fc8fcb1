//! The webhook bridge: provider callbacks → Kafka, answered 2xx only after the
//! broker acknowledged the record. Also `/healthz`, `/readyz` and `/metrics`.
//!
//! Checks, in order: in-flight limit (503 + Retry-After), content type (415),
//! body size (413), `X-Twilio-Signature` (403), required parameters (400).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use metrics::{counter, gauge, histogram};
use rdkafka::producer::{FutureRecord, Producer as _};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::codec::Codec;
use crate::config::{BridgeConfig, Settings};
use crate::records::{Param, WebhookRaw};
use crate::runner::RECEIVED_AT_HEADER;
use crate::twilio::signature;

/// Namespace of the bridge's UUIDv5 event ids.
const EVENT_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6e5e_b1d9_0c8e_4a7b_9d1f_2f0e_5c3a_7b11);

/// Everything a request handler needs.
pub struct Bridge {
    cfg: BridgeConfig,
    /// Where raw status callbacks and inbound messages go.
    status_topic: String,
    inbound_topic: String,
    tokens: Vec<String>,
    producer: crate::kafka::Producer,
    codec: Codec,
    pool: Pool,
    in_flight: Arc<Semaphore>,
}

impl Bridge {
    /// A bridge with its own producer whose delivery timeout is the bridge's
    /// answer deadline, so a record answered 503 is not delivered later.
    pub fn new(settings: &Settings, tokens: Vec<String>, pool: Pool) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            cfg: settings.bridge.clone(),
            status_topic: settings.topic("webhooks-status")?.to_string(),
            inbound_topic: settings.topic("webhooks-inbound")?.to_string(),
            tokens,
            producer: crate::kafka::Producer::new(&Self::producer_settings(settings))?,
            codec: Codec::new(&settings.schema_registry)?,
            pool,
            in_flight: Arc::new(Semaphore::new(settings.bridge.max_in_flight)),
        }))
    }

    /// The Kafka settings of the bridge's producer: no lingering (each
    /// request waits for its own acknowledgement) and the answer deadline as
    /// the delivery timeout.
    pub fn producer_settings(settings: &Settings) -> crate::config::KafkaConfig {
        let mut kafka = settings.kafka.clone();
        kafka.produce_timeout = settings.bridge.produce_timeout;
        kafka.linger = settings.bridge.linger;
        kafka
    }

    /// Waits until the producer can deliver, at most `within`.
    pub async fn producer_ready(&self, within: Duration) -> bool {
        self.producer.wait_ready(within).await
    }

    /// The routes: webhooks, probes, metrics.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/webhooks/twilio/status", post(status))
            .route("/webhooks/twilio/inbound", post(inbound))
            .route("/readyz", get(readyz))
            .with_state(self.clone())
            .merge(crate::metrics::router())
    }
}

/// Serves `router` on `listen` until `shutdown`, finishing requests in flight.
pub async fn serve(
    listen: std::net::SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("bridge.listen {listen}: cannot bind: {e}"))?;
    serve_on(listener, router, shutdown).await
}

/// Like [`serve`], on a bound listener.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| anyhow::anyhow!("bridge server: {e}"))
}

#[derive(Clone, Copy)]
enum Kind {
    Status,
    Inbound,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Kind::Status => "status",
            Kind::Inbound => "inbound",
        }
    }
    /// Parameters without which the record is useless, and the key parameter.
    fn required(self) -> &'static [&'static str] {
        match self {
            Kind::Status => &["MessageSid", "MessageStatus"],
            Kind::Inbound => &["MessageSid", "From"],
        }
    }
    fn key_param(self) -> &'static str {
        match self {
            Kind::Status => "MessageSid",
            Kind::Inbound => "From",
        }
    }
}

async fn status(
    State(b): State<Arc<Bridge>>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    webhook(b, Kind::Status, uri, headers, body).await
}

async fn inbound(
    State(b): State<Arc<Bridge>>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    webhook(b, Kind::Inbound, uri, headers, body).await
}

async fn webhook(
    b: Arc<Bridge>,
    kind: Kind,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = kind.route();
    let response = match b.in_flight.clone().try_acquire_owned() {
        Err(_) => busy("too many requests in flight"),
        Ok(permit) => {
            gauge!(crate::metrics::names::BRIDGE_IN_FLIGHT_REQUESTS).increment(1.0);
            let r = accept(&b, kind, &uri, &headers, body).await;
            gauge!(crate::metrics::names::BRIDGE_IN_FLIGHT_REQUESTS).decrement(1.0);
            drop(permit);
            r
        }
    };
    counter!(crate::metrics::names::BRIDGE_REQUESTS_TOTAL, "route" => route, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

fn busy(reason: &str) -> Response {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, reason);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn accept(
    b: &Bridge,
    kind: Kind,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let received_at = chrono::Utc::now().timestamp_millis();
    let query = uri.query().unwrap_or("");
    let query_pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let body_hash = query_pairs
        .iter()
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v.clone());

    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_json = match mime.as_str() {
        "application/x-www-form-urlencoded" => false,
        "application/json" if body_hash.is_some() => true,
        "application/json" => {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "application/json webhooks need the bodySHA256 query parameter",
            );
        }
        _ => {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type {content_type:?} not accepted; send application/x-www-form-urlencoded"
                ),
            );
        }
    };
    let bytes: Bytes = match axum::body::to_bytes(body, b.cfg.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {} bytes", b.cfg.max_body_bytes),
            );
        }
    };

    // The URL the provider called: the public base plus path and query as sent.
    let url = format!(
        "{}{}",
        b.cfg.public_url.trim_end_matches('/'),
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let provided = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok());
    let (params, raw_body) = if is_json {
        let hash_ok = body_hash
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case(&signature::body_sha256(&bytes)));
        if let Err(f) = signature::verify(&b.tokens, &url, &[], provided) {
            return refuse(f);
        }
        if !hash_ok {
            return refuse(signature::Failure::BodyHash);
        }
        let json: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return plain(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
        };
        let Some(obj) = json.as_object() else {
            return plain(StatusCode::BAD_REQUEST, "JSON body must be an object");
        };
        let params: Vec<(String, String)> = obj
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k.clone(), s.clone()),
                other => (k.clone(), other.to_string()),
            })
            .collect();
        (params, Some(String::from_utf8_lossy(&bytes).into_owned()))
    } else {
        let params: Vec<(String, String)> =
            url::form_urlencoded::parse(&bytes).into_owned().collect();
        if let Err(f) = signature::verify(&b.tokens, &url, &params, provided) {
            return refuse(f);
        }
        (params, None)
    };

    for required in kind.required() {
        if !params.iter().any(|(k, v)| k == required && !v.is_empty()) {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("missing parameter {required}"),
            );
        }
    }
    let key = params
        .iter()
        .find(|(k, _)| k == kind.key_param())
        .map(|(_, v)| v.clone())
        .unwrap_or_default();

    // The event's identity comes from what the signature covers, never from
    // the unsigned `I-Twilio-Idempotency-Token` header: a provider retry
    // repeats the same signed content, so it gets the same event id and the
    // sinks keep one copy; a captured request sent again under a new token
    // is the same event, not a later one (it cannot undo a STOP).
    let identity = {
        let mut sorted = params.clone();
        sorted.sort();
        let mut s = format!("{}|{}|", uri.path(), query);
        for (k, v) in &sorted {
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('&');
        }
        if let Some(body) = &raw_body {
            s.push_str(body);
        }
        s
    };
    let record = WebhookRaw {
        event_id: uuid_v5(identity.as_bytes()).to_string(),
        kind: kind.route().to_string(),
        path: uri.path().to_string(),
        query: query.to_string(),
        params: params
            .into_iter()
            .map(|(name, value)| Param { name, value })
            .collect(),
        body: raw_body,
        content_type,
        received_at,
    };
    let topic = match kind {
        Kind::Status => &b.status_topic,
        Kind::Inbound => &b.inbound_topic,
    };
    let payload = match b.codec.encode(topic, &record).await {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot encode webhook");
            return busy("cannot encode the record right now");
        }
    };
    let started = Instant::now();
    let received = received_at.to_string();
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: RECEIVED_AT_HEADER,
        value: Some(received.as_bytes()),
    });
    let send = b.producer.send(
        FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(&payload)
            .headers(headers),
        b.cfg.produce_timeout,
    );
    let result = tokio::time::timeout(b.cfg.produce_timeout + Duration::from_secs(1), send).await;
    histogram!(crate::metrics::names::BRIDGE_PRODUCE_DURATION_SECONDS, "route" => kind.route())
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(_)) => match kind {
            Kind::Status => StatusCode::OK.into_response(),
            Kind::Inbound => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/xml")],
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
            )
                .into_response(),
        },
        Ok(Err((e, _))) => {
            warn!(error = %e, topic, "broker did not acknowledge webhook");
            busy("broker unavailable, retry")
        }
        Err(_) => {
            warn!(topic, "broker acknowledgement timed out");
            busy("broker unavailable, retry")
        }
    }
}

/// A name-based (version 5, SHA-1) UUID of `name` in the bridge's namespace.
fn uuid_v5(name: &[u8]) -> uuid::Uuid {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(EVENT_NS.as_bytes());
    h.update(name);
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

fn refuse(f: signature::Failure) -> Response {
    counter!(crate::metrics::names::BRIDGE_SIGNATURE_FAILURES_TOTAL, "reason" => f.label())
        .increment(1);
    plain(
        StatusCode::FORBIDDEN,
        format!("signature check failed: {}", f.label()),
    )
}

/// 200 when the broker and Postgres both answer, else 503 naming which does not.
async fn readyz(State(b): State<Arc<Bridge>>) -> Response {
    let producer = b.producer.current();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let pg = async {
        let c = tokio::time::timeout(Duration::from_secs(2), b.pool.get())
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        c.simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let (kafka, pg) = tokio::join!(kafka, pg);
    let kafka = kafka
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .and_then(|()| {
            if b.producer.has_id() {
                Ok(())
            } else {
                Err("the producer has no producer id yet".to_string())
            }
        });
    let body = serde_json::json!({
        "kafka": kafka.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.clone()),
        "postgres": pg.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.clone()),
    });
    let status = if kafka.is_ok() && pg.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
