//! The webhook bridge: provider callbacks → Kafka, answered 2xx only after the
//! broker acknowledged the record. Also `/healthz` and `/readyz`.
//!
//! Checks, in order: in-flight limit (503 + Retry-After), content type (415),
//! body size (413), `X-Twilio-Signature` (403), required parameters (400).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
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
    /// The last readiness answer and when it was taken: `/readyz` checks at
    /// most once per [`READY_FOR`], one check at a time, whoever polls it.
    ready: tokio::sync::Mutex<Option<(std::time::Instant, StatusCode, serde_json::Value)>>,
}

/// How long a `/readyz` answer is reused.
const READY_FOR: Duration = Duration::from_secs(1);

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
            ready: tokio::sync::Mutex::new(None),
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

    /// The routes: webhooks and probes. Nothing else is public: metrics are
    /// on `metrics.listen`, the admin API on `admin.listen`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/webhooks/twilio/status",
                post(webhook).layer(Extension(Kind::Status)),
            )
            .route(
                "/webhooks/twilio/inbound",
                post(webhook).layer(Extension(Kind::Inbound)),
            )
            .route("/readyz", get(readyz))
            .route("/healthz", get(|| std::future::ready("ok")))
            .with_state(self.clone())
    }
}

/// What the server allows a connection: how long to send a request head
/// (and, in the webhook handlers, a body), and how many connections at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub read_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn of(cfg: &BridgeConfig) -> Self {
        Self {
            read_timeout: cfg.read_timeout,
            max_connections: cfg.max_connections,
        }
    }
}

/// Serves `router` on a bound listener until `shutdown`, finishing
/// requests in flight. Each connection must send its
/// request head within `read_timeout` (hyper closes it otherwise); beyond
/// `max_connections` open ones, a new connection is closed at once, so
/// clients that connect and stall cannot starve the rest.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "bridge: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counter!(crate::metrics::names::BRIDGE_CONNECTIONS_REFUSED_TOTAL).increment(1);
            continue; // dropped: closed at once
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    // Requests in flight finish; a client still trickling is not waited for
    // past its read timeout.
    let _ = tokio::time::timeout(
        limits.read_timeout + Duration::from_secs(5),
        graceful.shutdown(),
    )
    .await;
    Ok(())
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

/// A provider callback on the route of `kind` (each route's own `Extension`).
async fn webhook(
    State(b): State<Arc<Bridge>>,
    Extension(kind): Extension<Kind>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = kind.route();
    // The body first, within the read timeout: a client that trickles or
    // stalls holds no in-flight slot while it does.
    let limit = b.cfg.max_body_bytes;
    let response =
        match tokio::time::timeout(b.cfg.read_timeout, axum::body::to_bytes(body, limit)).await {
            Err(_) => plain(
                StatusCode::REQUEST_TIMEOUT,
                format!("body not received within {:?}", b.cfg.read_timeout),
            ),
            Ok(Err(_)) => plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes"),
            ),
            Ok(Ok(bytes)) => take_slot(&b, kind, &uri, &headers, bytes).await,
        };
    counter!(crate::metrics::names::BRIDGE_REQUESTS_TOTAL, "route" => route, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

/// A complete request: an in-flight slot, or 503.
async fn take_slot(
    b: &Bridge,
    kind: Kind,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Response {
    match b.in_flight.clone().try_acquire_owned() {
        Err(_) => busy("too many requests in flight"),
        Ok(permit) => {
            gauge!(crate::metrics::names::BRIDGE_IN_FLIGHT_REQUESTS).increment(1.0);
            let r = accept(b, kind, uri, headers, bytes).await;
            gauge!(crate::metrics::names::BRIDGE_IN_FLIGHT_REQUESTS).decrement(1.0);
            drop(permit);
            r
        }
    }
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
    bytes: Bytes,
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
    // One check at a time; callers meanwhile wait for it and share it.
    let mut last = b.ready.lock().await;
    if let Some((at, status, body)) = last.as_ref()
        && at.elapsed() < READY_FOR
    {
        return (*status, axum::Json(body.clone())).into_response();
    }
    let (status, body) = check_ready(&b).await;
    *last = Some((std::time::Instant::now(), status, body.clone()));
    (status, axum::Json(body)).into_response()
}

/// Whether the broker and PostgreSQL answer: the status and a body that
/// says which, without raw error text (that goes to the log).
async fn check_ready(b: &Bridge) -> (StatusCode, serde_json::Value) {
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
    let say = |what: &str, r: &Result<(), String>| match r {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(dependency = what, error = %e, "not ready");
            "unavailable"
        }
    };
    let body = serde_json::json!({
        "kafka": say("kafka", &kafka),
        "postgres": say("postgres", &pg),
    });
    let status = if kafka.is_ok() && pg.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}
