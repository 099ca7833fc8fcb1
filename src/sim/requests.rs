//! The Messages API as the simulator answers it: validation, Twilio's
//! error documents, HTTP Basic auth, the token bucket, the handlers.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::errors::*;
use super::plan::*;
use super::*;
use crate::twilio::API_VERSION;

/// `SM` + 32 lowercase hex digits.
pub(super) fn new_sid() -> String {
    format!("SM{}", uuid::Uuid::new_v4().simple())
}

/// `+` and 8–15 digits, the first 1–9, optionally prefixed `whatsapp:`.
pub(super) fn valid_to(to: &str) -> bool {
    let number = to.strip_prefix("whatsapp:").unwrap_or(to);
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// The first non-empty value of `name`.
pub(super) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// `Authorization: Basic …` → (user, password).
pub(super) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// A validated send request.
#[derive(Debug)]
pub(super) struct SendRequest {
    pub(super) to: String,
    pub(super) from: Option<String>,
    pub(super) messaging_service_sid: Option<String>,
    pub(super) body: String,
    pub(super) num_media: usize,
    pub(super) status_callback: Option<String>,
    /// An approved template (Content API) instead of a body, and its
    /// variables as sent (a JSON object).
    pub(super) content_sid: Option<String>,
    pub(super) content_variables: Option<String>,
}

pub(super) fn validate_send(params: &[(String, String)]) -> Result<SendRequest, ApiError> {
    let to = param(params, "To").ok_or_else(|| ApiError::new(21604))?;
    if !valid_to(to) {
        return Err(ApiError::with(
            21211,
            format!("The 'To' number {to} is not a valid phone number."),
        ));
    }
    let from = param(params, "From");
    let messaging_service_sid = param(params, "MessagingServiceSid");
    if from.is_none() && messaging_service_sid.is_none() {
        return Err(ApiError::new(21603));
    }
    let num_media = params
        .iter()
        .filter(|(k, v)| k == "MediaUrl" && !v.is_empty())
        .count();
    let body = param(params, "Body");
    let content_sid = param(params, "ContentSid");
    if body.is_none() && num_media == 0 && content_sid.is_none() {
        return Err(ApiError::new(21602));
    }
    let status_callback = param(params, "StatusCallback");
    if let Some(u) = status_callback
        && !url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
    {
        return Err(ApiError::new(21609));
    }
    Ok(SendRequest {
        to: to.to_string(),
        from: from.map(str::to_string),
        messaging_service_sid: messaging_service_sid.map(str::to_string),
        body: body.unwrap_or("").to_string(),
        num_media,
        status_callback: status_callback.map(str::to_string),
        content_sid: content_sid.map(str::to_string),
        content_variables: param(params, "ContentVariables").map(str::to_string),
    })
}

pub(super) async fn send(
    State(sim): State<Arc<Simulator>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = sim.authorize(&account, &headers) {
        return *r;
    }
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let (result, delay) = sim.accept(&params);
    let wait = sim.cfg.api_latency.saturating_add(delay);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    match result {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn list(
    State(sim): State<Arc<Simulator>>,
    Path(account): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = sim.authorize(&account, &headers) {
        return *r;
    }
    let query = query.unwrap_or_default();
    let q: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let page_size = param(&q, "PageSize")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let messages: Vec<Value> = {
        let lg = sim.ledger();
        let indexes: Vec<usize> = match param(&q, "To") {
            Some(to) => lg
                .by_to
                .get(to)
                .map(|v| v.iter().rev().take(page_size).copied().collect())
                .unwrap_or_default(),
            None => (0..lg.messages.len()).rev().take(page_size).collect(),
        };
        indexes
            .into_iter()
            .filter_map(|i| lg.messages.get(i).map(|m| m.json(&sim.account_sid)))
            .collect()
    };
    let uri = if query.is_empty() {
        format!("/{API_VERSION}/Accounts/{account}/Messages.json")
    } else {
        format!("/{API_VERSION}/Accounts/{account}/Messages.json?{query}")
    };
    Json(json!({
        "end": messages.len().saturating_sub(1),
        "first_page_uri": uri,
        "next_page_uri": null,
        "page": 0,
        "page_size": page_size,
        "previous_page_uri": null,
        "start": 0,
        "uri": uri,
        "messages": messages,
    }))
    .into_response()
}

pub(super) async fn fetch(
    State(sim): State<Arc<Simulator>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = sim.authorize(&account, &headers) {
        return *r;
    }
    let sid = file.strip_suffix(".json").unwrap_or("");
    let found = {
        let lg = sim.ledger();
        lg.index
            .get(sid)
            .and_then(|&i| lg.messages.get(i))
            .map(|m| m.json(&sim.account_sid))
    };
    match found {
        Some(v) => Json(v).into_response(),
        None => ApiError::with(
            20404,
            format!("The requested resource /{API_VERSION}/Accounts/{account}/Messages/{file} was not found"),
        )
        .into_response(),
    }
}

fn too_many(message: String) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(json!({ "error": message })),
    )
        .into_response()
}

pub(super) fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

/// Numbers with scripted outcomes at once, and outcomes per number: the
/// map is bounded, whoever calls.
pub(super) const MAX_SCRIPTED_NUMBERS: usize = 10_000;
pub(super) const MAX_SCRIPT_OUTCOMES: usize = 1_000;

/// The controls (`/sim/script`, `/sim/reset`, `/sim/stats`) need the
/// account's credentials (HTTP basic, as the API): 401 otherwise.
pub(super) async fn control_auth(
    State(sim): State<Arc<Simulator>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if sim.credentials_match(req.headers()) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "the simulator's controls need its account SID and auth token (HTTP basic)" })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Basic realm=\"provider-sim\""),
    );
    r
}

pub(super) async fn script(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
    let req: ScriptRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("invalid script: {e}")),
    };
    if !valid_to(&req.to) {
        return bad_request(format!("invalid script: {:?} is not a valid 'To'", req.to));
    }
    for (i, o) in req.outcomes.iter().enumerate() {
        if let Err(e) = o.validate() {
            return bad_request(format!("invalid script: outcomes[{i}]: {e}"));
        }
    }
    let pending = {
        let mut lg = sim.ledger();
        if !lg.scripts.contains_key(&req.to) && lg.scripts.len() >= MAX_SCRIPTED_NUMBERS {
            return too_many(format!(
                "{MAX_SCRIPTED_NUMBERS} numbers already have scripted outcomes; POST /sim/reset first"
            ));
        }
        let queue = lg.scripts.entry(req.to.clone()).or_default();
        if queue.len() + req.outcomes.len() > MAX_SCRIPT_OUTCOMES {
            let had = queue.len();
            return too_many(format!(
                "{} has {had} outcomes pending; {} more would pass the limit of {MAX_SCRIPT_OUTCOMES}",
                req.to,
                req.outcomes.len()
            ));
        }
        queue.extend(req.outcomes);
        queue.len()
    };
    Json(json!({ "to": req.to, "pending": pending })).into_response()
}

/// `POST /sim/inbound {"from": "+1…", "body": "hi", "to": "+1…"}`: the person
/// writes on WhatsApp (their window opens; with `inbound-url`, the message
/// is delivered there signed).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InboundRequest {
    pub(super) from: String,
    #[serde(default)]
    pub(super) body: String,
    /// The business's number. Default `+15005550006`.
    #[serde(default)]
    pub(super) to: Option<String>,
}

/// Numbers whose window the simulator keeps at most.
pub(super) const MAX_WINDOWS: usize = 100_000;

pub(super) async fn inbound(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
    let req: InboundRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("invalid inbound: {e}")),
    };
    let to = req.to.unwrap_or_else(|| "+15005550006".into());
    for (field, n) in [("from", &req.from), ("to", &to)] {
        if n.starts_with("whatsapp:") || !valid_to(n) {
            return bad_request(format!(
                "invalid inbound: {field} {n:?} is not a number (+ and 8-15 digits, no prefix)"
            ));
        }
    }
    {
        let lg = sim.ledger();
        if lg.windows.len() >= MAX_WINDOWS
            && !lg.windows.contains_key(&format!("whatsapp:{}", req.from))
        {
            return too_many(format!(
                "{MAX_WINDOWS} numbers already have a window; POST /sim/reset first"
            ));
        }
    }
    let delivered = sim.inbound(&req.from, &to, &req.body).await;
    Json(json!({ "from": req.from, "window_open": true, "delivered": delivered })).into_response()
}

pub(super) async fn reset(State(sim): State<Arc<Simulator>>) -> Response {
    sim.reset();
    Json(json!({ "reset": true })).into_response()
}

pub(super) async fn stats(State(sim): State<Arc<Simulator>>) -> Response {
    let lg = sim.ledger();
    Json(&lg.stats).into_response()
}
