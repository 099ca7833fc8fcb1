//! `ese provider-sim`: a Twilio-compatible Messages API simulator, so the
//! sender, the webhook bridge and the receipts stage can be tested and
//! benchmarked end to end without the real provider.
//!
//! It answers `POST/GET /2010-04-01/Accounts/{sid}/Messages.json` and
//! `GET …/Messages/{sid}.json` with Twilio's JSON and error shapes (HTTP Basic
//! auth), rate-limits with a token bucket, and after each accepted send POSTs
//! signed status callbacks (`X-Twilio-Signature`, `I-Twilio-Idempotency-Token`)
//! to `StatusCallback` with configurable latency, jitter, failure mix,
//! duplicates and reordering. Tests script per-recipient outcomes
//! (`POST /sim/script`), clear state (`POST /sim/reset`) and read exact counts
//! (`GET /sim/stats`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use metrics::counter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::config::{FailureMix, SimConfig};
use crate::twilio::API_VERSION;
use crate::twilio::signature::sign;
const MAX_SCRIPT_DELAY_MS: u64 = 600_000;

/// A Twilio API error: `code` decides the HTTP status.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    code: i32,
    message: String,
}

impl ApiError {
    fn new(code: i32) -> Self {
        Self {
            code,
            message: default_message(code),
        }
    }
    fn with(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = error_body(self.code, &self.message);
        (status, Json(body)).into_response()
    }
}

/// The HTTP status the provider answers an API error `code` with.
fn http_status(code: i32) -> StatusCode {
    crate::twilio::errors::lookup(code)
        .filter(|c| c.http_status > 0)
        .and_then(|c| StatusCode::from_u16(c.http_status).ok())
        .unwrap_or(StatusCode::BAD_REQUEST)
}

/// Twilio's error document.
fn error_body(code: i32, message: &str) -> (StatusCode, Value) {
    let status = http_status(code);
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, body)
}

fn default_message(code: i32) -> String {
    match crate::twilio::errors::lookup(code) {
        Some(c) => c.message.to_string(),
        None => format!("Simulated error {code}"),
    }
}

fn delivery_error_message(code: i32) -> &'static str {
    crate::twilio::errors::lookup(code).map_or("Message delivery failed", |c| c.message)
}

/// `SM` + 32 lowercase hex digits.
fn new_sid() -> String {
    format!("SM{}", uuid::Uuid::new_v4().simple())
}

/// `+` and 8–15 digits, the first 1–9, optionally prefixed `whatsapp:`.
fn valid_to(to: &str) -> bool {
    let number = to.strip_prefix("whatsapp:").unwrap_or(to);
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// The first non-empty value of `name`.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// `Authorization: Basic …` → (user, password).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
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
struct SendRequest {
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    num_media: usize,
    status_callback: Option<String>,
}

fn validate_send(params: &[(String, String)]) -> Result<SendRequest, ApiError> {
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
    if body.is_none() && num_media == 0 {
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
    })
}

/// Token bucket: `rate` tokens/s up to `capacity`; rate 0 = unlimited.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(if burst == 0 { rate.max(1) } else { burst });
        Self {
            rate: f64::from(rate),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A scripted outcome for the next send to a recipient; `{}` = plain success.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outcome {
    #[serde(default)]
    api_error: Option<i32>,
    #[serde(default)]
    delivery: Option<String>,
    #[serde(default)]
    error_code: Option<i32>,
    #[serde(default)]
    delay_ms: u64,
}

impl Outcome {
    fn validate(&self) -> Result<(), String> {
        if self.api_error.is_some() && (self.delivery.is_some() || self.error_code.is_some()) {
            return Err("an outcome has api_error or delivery, not both".into());
        }
        match (self.delivery.as_deref(), self.error_code) {
            (None | Some("delivered"), Some(_)) => {
                return Err("error_code needs delivery \"undelivered\" or \"failed\"".into());
            }
            (None | Some("delivered" | "undelivered" | "failed"), _) => {}
            (Some(other), _) => {
                return Err(format!(
                    "unknown delivery {other:?} (delivered, undelivered, failed)"
                ));
            }
        }
        if self.delay_ms > MAX_SCRIPT_DELAY_MS {
            return Err(format!("delay_ms must be at most {MAX_SCRIPT_DELAY_MS}"));
        }
        Ok(())
    }

    fn fate(&self) -> Option<Fate> {
        match self.delivery.as_deref()? {
            "delivered" => Some(Fate::Delivered),
            status => Some(Fate::Failed {
                status: status.to_string(),
                code: self
                    .error_code
                    .unwrap_or(if status == "failed" { 30008 } else { 30003 }),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptRequest {
    to: String,
    outcomes: Vec<Outcome>,
}

/// How an accepted message ends.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Delivered,
    Failed { status: String, code: i32 },
}

impl Fate {
    fn status(&self) -> &str {
        match self {
            Fate::Delivered => "delivered",
            Fate::Failed { status, .. } => status,
        }
    }
}

/// `u` uniform in [0, 1) picks a failure by cumulative rate, else delivered.
fn random_fate(failures: &[FailureMix], u: f64) -> Fate {
    let mut acc = 0.0;
    for f in failures {
        acc += f.rate;
        if u < acc {
            return Fate::Failed {
                status: f.status.clone(),
                code: f.code,
            };
        }
    }
    Fate::Delivered
}

/// One callback to fire `at` after the send.
#[derive(Debug, Clone, PartialEq)]
struct Planned {
    status: String,
    error_code: Option<i32>,
    at: Duration,
    /// `I-Twilio-Idempotency-Token`; a duplicate carries the same one.
    token: String,
}

fn jittered(base: Duration, jitter: Duration, rng: &mut StdRng) -> Duration {
    let j = jitter.as_micros().min(i64::MAX as u128) as i64;
    let delta = if j > 0 { rng.random_range(-j..=j) } else { 0 };
    let micros = (base.as_micros().min(i64::MAX as u128) as i64)
        .saturating_add(delta)
        .max(0);
    Duration::from_micros(micros as u64)
}

/// The callbacks of one message, sorted by firing time.
fn plan_callbacks(cfg: &SimConfig, fate: &Fate, rng: &mut StdRng) -> Vec<Planned> {
    let mut steps: Vec<(String, Option<i32>)> = Vec::with_capacity(4);
    let mut final_added = false;
    for s in &cfg.callback_statuses {
        match (s.as_str(), fate) {
            ("delivered", Fate::Failed { status, code }) => {
                steps.push((status.clone(), Some(*code)));
                final_added = true;
            }
            _ => steps.push((s.clone(), None)),
        }
    }
    if let Fate::Failed { status, code } = fate
        && !final_added
    {
        steps.push((status.clone(), Some(*code)));
    }
    let mut plan = Vec::with_capacity(steps.len() + 2);
    let mut prev = Duration::ZERO;
    for (status, error_code) in steps {
        let base = match status.as_str() {
            "queued" => Duration::ZERO,
            "sent" => cfg.sent_after,
            _ => cfg.delivered_after,
        };
        let at = jittered(base, cfg.jitter, rng).max(prev);
        prev = at;
        let token = uuid::Uuid::new_v4().to_string();
        plan.push(Planned {
            status,
            error_code,
            at,
            token,
        });
    }
    let n = plan.len();
    if n >= 2 && cfg.reorder_rate > 0.0 && rng.random_bool(cfg.reorder_rate) {
        let (earlier, last) = (plan[n - 2].at, plan[n - 1].at);
        plan[n - 1].at = earlier;
        plan[n - 2].at = last.max(earlier + Duration::from_millis(1));
    }
    if cfg.duplicate_rate > 0.0 {
        let mut dups = Vec::new();
        for p in &plan {
            if rng.random_bool(cfg.duplicate_rate) {
                dups.push(Planned {
                    at: p.at + Duration::from_millis(rng.random_range(1..=50)),
                    ..p.clone()
                });
            }
        }
        plan.extend(dups);
    }
    plan.sort_by_key(|p| p.at);
    plan
}

/// queued < sent < final: a message's status only moves forward.
fn rank(status: &str) -> u8 {
    match status {
        "queued" => 0,
        "sent" => 1,
        _ => 2,
    }
}

#[derive(Debug)]
struct Message {
    sid: String,
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    num_media: usize,
    status: String,
    error_code: Option<i32>,
    created: chrono::DateTime<chrono::Utc>,
    updated: chrono::DateTime<chrono::Utc>,
    sent: Option<chrono::DateTime<chrono::Utc>>,
}

impl Message {
    fn json(&self, account: &str) -> Value {
        json!({
            "sid": self.sid,
            "account_sid": account,
            "to": self.to,
            "from": self.from,
            "messaging_service_sid": self.messaging_service_sid,
            "body": self.body,
            "status": self.status,
            "num_segments": "1",
            "num_media": self.num_media.to_string(),
            "direction": "outbound-api",
            "api_version": API_VERSION,
            "date_created": self.created.to_rfc2822(),
            "date_updated": self.updated.to_rfc2822(),
            "date_sent": self.sent.map(|d| d.to_rfc2822()),
            "error_code": self.error_code,
            "error_message": self.error_code.map(delivery_error_message),
            "price": null,
            "price_unit": "USD",
            "uri": format!("/{API_VERSION}/Accounts/{account}/Messages/{}.json", self.sid),
        })
    }
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    total: u64,
    accepted: u64,
    rejected: BTreeMap<i32, u64>,
    per_recipient: BTreeMap<String, u64>,
    per_second: BTreeMap<i64, u64>,
    /// Accepted sends by the final status planned for them.
    fates: BTreeMap<String, u64>,
    callbacks: CallbackStats,
}

#[derive(Debug, Default, Serialize)]
struct CallbackStats {
    sent: u64,
    failed: u64,
}

/// Everything mutable, behind one mutex never held across an await.
struct Ledger {
    messages: Vec<Message>,
    index: HashMap<String, usize>,
    by_to: HashMap<String, Vec<usize>>,
    scripts: HashMap<String, VecDeque<Outcome>>,
    stats: Stats,
    bucket: TokenBucket,
    rng: StdRng,
    /// Cancelled on reset and shutdown: pending callbacks of the past stop.
    generation: CancellationToken,
}

impl Ledger {
    fn reject(&mut self, e: ApiError) -> Result<Value, ApiError> {
        *self.stats.rejected.entry(e.code).or_default() += 1;
        let outcome = if e.code == 20429 {
            "rate_limited"
        } else {
            "rejected"
        };
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        Err(e)
    }

    fn insert(&mut self, m: Message, second: i64) {
        self.stats.accepted += 1;
        *self.stats.per_recipient.entry(m.to.clone()).or_default() += 1;
        *self.stats.per_second.entry(second).or_default() += 1;
        let i = self.messages.len();
        self.index.insert(m.sid.clone(), i);
        self.by_to.entry(m.to.clone()).or_default().push(i);
        self.messages.push(m);
    }
}

/// What a message's callbacks need.
struct Target {
    sid: String,
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    url: Option<String>,
}

fn callback_params(account: &str, t: &Target, step: &Planned) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::with_capacity(12);
    let mut add = |k: &str, v: &str| p.push((k.to_string(), v.to_string()));
    add("MessageSid", &t.sid);
    add("SmsSid", &t.sid);
    add("AccountSid", account);
    add("To", &t.to);
    if let Some(from) = &t.from {
        add("From", from);
    }
    if let Some(mss) = &t.messaging_service_sid {
        add("MessagingServiceSid", mss);
    }
    add("MessageStatus", &step.status);
    add("SmsStatus", &step.status);
    add("ApiVersion", API_VERSION);
    if let Some(code) = step.error_code {
        add("ErrorCode", &code.to_string());
        add("ErrorMessage", delivery_error_message(code));
    }
    p
}

/// The simulator: configuration, credentials, state and the callback client.
pub struct Simulator {
    cfg: SimConfig,
    account_sid: String,
    auth_token: String,
    ledger: Mutex<Ledger>,
    callback_slots: Arc<Semaphore>,
    http: reqwest::Client,
}

impl Simulator {
    pub fn new(
        cfg: SimConfig,
        account_sid: String,
        auth_token: String,
    ) -> anyhow::Result<Arc<Self>> {
        cfg.validate()?;
        if account_sid.is_empty() || auth_token.is_empty() {
            anyhow::bail!(
                "provider-sim needs an account SID and an auth token (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)"
            );
        }
        let seed = if cfg.seed == 0 {
            rand::random::<u64>()
        } else {
            cfg.seed
        };
        let http = crate::http::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("provider-sim: cannot build the callback client: {e}"))?;
        let ledger = Ledger {
            messages: Vec::new(),
            index: HashMap::new(),
            by_to: HashMap::new(),
            scripts: HashMap::new(),
            stats: Stats::default(),
            bucket: TokenBucket::new(cfg.rate_limit, cfg.burst, Instant::now()),
            rng: StdRng::seed_from_u64(seed),
            generation: CancellationToken::new(),
        };
        Ok(Arc::new(Self {
            callback_slots: Arc::new(Semaphore::new(cfg.callback_concurrency)),
            cfg,
            account_sid,
            auth_token,
            ledger: Mutex::new(ledger),
            http,
        }))
    }

    /// The API, the test controls under `/sim/`, and `/metrics`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Messages.json",
                post(send).get(list),
            )
            .route("/2010-04-01/Accounts/{account}/Messages/{file}", get(fetch))
            .route("/sim/script", post(script))
            .route("/sim/reset", post(reset))
            .route("/sim/stats", get(stats))
            .route("/sim/healthz", get(|| std::future::ready("ok")))
            .with_state(self.clone())
            .merge(crate::metrics::router())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorize(&self, path_account: &str, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let ok = basic_credentials(headers).is_some_and(|(user, password)| {
            user == self.account_sid && password == self.auth_token && path_account == user
        });
        if ok {
            return Ok(());
        }
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => "unauthorized")
            .increment(1);
        let mut r = ApiError::new(20003).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Twilio API\""),
        );
        Err(Box::new(r))
    }

    /// Records one authenticated send and schedules its callbacks; returns the
    /// answer and the scripted delay to wait before giving it.
    fn accept(
        self: &Arc<Self>,
        params: &[(String, String)],
    ) -> (Result<Value, ApiError>, Duration) {
        let now = chrono::Utc::now();
        let mut lg = self.ledger();
        lg.stats.total += 1;
        let req = match validate_send(params) {
            Ok(r) => r,
            Err(e) => return (lg.reject(e), Duration::ZERO),
        };
        if !lg.bucket.try_take(Instant::now()) {
            return (lg.reject(ApiError::new(20429)), Duration::ZERO);
        }
        let outcome = match lg.scripts.get_mut(&req.to) {
            Some(queue) => {
                let next = queue.pop_front();
                if queue.is_empty() {
                    lg.scripts.remove(&req.to);
                }
                next.unwrap_or_default()
            }
            None => Outcome::default(),
        };
        let delay = Duration::from_millis(outcome.delay_ms);
        if let Some(code) = outcome.api_error {
            return (lg.reject(ApiError::new(code)), delay);
        }
        let fate = match outcome.fate() {
            Some(f) => f,
            None if self.cfg.failures.is_empty() => Fate::Delivered,
            None => {
                let u = lg.rng.random::<f64>();
                random_fate(&self.cfg.failures, u)
            }
        };
        let plan = plan_callbacks(&self.cfg, &fate, &mut lg.rng);
        *lg.stats.fates.entry(fate.status().to_string()).or_default() += 1;
        let message = Message {
            sid: new_sid(),
            to: req.to,
            from: req.from,
            messaging_service_sid: req.messaging_service_sid,
            body: req.body,
            num_media: req.num_media,
            status: "queued".into(),
            error_code: None,
            created: now,
            updated: now,
            sent: None,
        };
        let answer = message.json(&self.account_sid);
        let target = Target {
            sid: message.sid.clone(),
            to: message.to.clone(),
            from: message.from.clone(),
            messaging_service_sid: message.messaging_service_sid.clone(),
            url: req.status_callback,
        };
        lg.insert(message, now.timestamp());
        let cancel = lg.generation.clone();
        drop(lg);
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => "accepted").increment(1);
        self.schedule(target, plan, cancel);
        (Ok(answer), delay)
    }

    /// One task per message sleeps until each callback is due, moves the
    /// stored status forward and hands the POST to a bounded delivery task.
    fn schedule(self: &Arc<Self>, target: Target, plan: Vec<Planned>, cancel: CancellationToken) {
        if plan.is_empty() {
            return;
        }
        let sim = self.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for step in plan {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(start + step.at) => {}
                }
                sim.mark(&target.sid, &step);
                let Some(url) = target.url.clone() else {
                    continue;
                };
                // Acquired here, in firing order (the semaphore is fair).
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = sim.callback_slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let params = callback_params(&sim.account_sid, &target, &step);
                let signature = sign(&sim.auth_token, &url, &params);
                let (sim2, cancel2, token) = (sim.clone(), cancel.clone(), step.token);
                tokio::spawn(async move {
                    let ok = sim2
                        .deliver(&url, &params, &signature, &token, &cancel2)
                        .await;
                    drop(permit);
                    if !cancel2.is_cancelled() {
                        sim2.count_callback(ok);
                    }
                });
            }
        });
    }

    fn mark(&self, sid: &str, step: &Planned) {
        let mut lg = self.ledger();
        let Some(&i) = lg.index.get(sid) else { return };
        let Some(m) = lg.messages.get_mut(i) else {
            return;
        };
        if rank(&step.status) <= rank(&m.status) {
            return;
        }
        let now = chrono::Utc::now();
        m.status = step.status.clone();
        m.updated = now;
        m.error_code = step.error_code;
        if m.sent.is_none() && rank(&step.status) >= 1 {
            m.sent = Some(now);
        }
    }

    /// POSTs one callback, retrying on connection error or non-2xx.
    async fn deliver(
        &self,
        url: &str,
        params: &[(String, String)],
        signature: &str,
        token: &str,
        cancel: &CancellationToken,
    ) -> bool {
        for attempt in 0..=self.cfg.callback_retries {
            if attempt > 0 {
                counter!(crate::metrics::names::SIM_CALLBACKS_TOTAL, "outcome" => "retried")
                    .increment(1);
                let backoff = Duration::from_millis(100u64 << (attempt - 1).min(16));
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            let request = self
                .http
                .post(url)
                .header("X-Twilio-Signature", signature)
                .header("I-Twilio-Idempotency-Token", token)
                .form(&params)
                .send();
            let result = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = request => r,
            };
            match result {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => debug!(url, status = %r.status(), attempt, "status callback refused"),
                Err(e) => debug!(url, error = %e, attempt, "status callback failed"),
            }
        }
        false
    }

    fn count_callback(&self, ok: bool) {
        let mut lg = self.ledger();
        if ok {
            lg.stats.callbacks.sent += 1;
        } else {
            lg.stats.callbacks.failed += 1;
        }
        drop(lg);
        let outcome = if ok { "sent" } else { "failed" };
        counter!(crate::metrics::names::SIM_CALLBACKS_TOTAL, "outcome" => outcome).increment(1);
    }

    fn reset(&self) {
        let mut lg = self.ledger();
        lg.generation.cancel();
        lg.generation = CancellationToken::new();
        lg.messages.clear();
        lg.index.clear();
        lg.by_to.clear();
        lg.scripts.clear();
        lg.stats = Stats::default();
        lg.bucket = TokenBucket::new(self.cfg.rate_limit, self.cfg.burst, Instant::now());
    }
}

async fn send(
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

async fn list(
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

async fn fetch(
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

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

async fn script(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
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
        let queue = lg.scripts.entry(req.to.clone()).or_default();
        queue.extend(req.outcomes);
        queue.len()
    };
    Json(json!({ "to": req.to, "pending": pending })).into_response()
}

async fn reset(State(sim): State<Arc<Simulator>>) -> Response {
    sim.reset();
    Json(json!({ "reset": true })).into_response()
}

async fn stats(State(sim): State<Arc<Simulator>>) -> Response {
    let lg = sim.ledger();
    Json(&lg.stats).into_response()
}

/// Binds `provider-sim.listen` and serves until `shutdown`.
pub async fn serve(sim: Arc<Simulator>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = sim.cfg.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim.listen {listen}: cannot bind: {e}"))?;
    serve_on(sim, listener, shutdown).await
}

/// Serves on a bound listener until `shutdown`, then stops pending callbacks.
/// Binds `cfg.listen` and serves the simulator (credentials from the
/// environment) in a task until `shutdown`; returns the bound address.
pub async fn start(
    cfg: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let creds = crate::twilio::Credentials::from_env()?;
    let sim = Simulator::new(cfg.clone(), creds.account_sid, creds.auth_token)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim.listen {}: cannot bind: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve_on(sim, listener, shutdown))))
}

pub async fn serve_on(
    sim: Arc<Simulator>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "provider simulator listening");
    }
    let result = axum::serve(listener, sim.router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim server: {e}"));
    sim.ledger().generation.cancel();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn cfg() -> SimConfig {
        SimConfig {
            jitter: Duration::ZERO,
            ..SimConfig::default()
        }
    }

    #[test]
    fn sid_format() {
        let a = new_sid();
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("SM"));
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(a, new_sid());
    }

    #[test]
    fn to_validation() {
        for ok in [
            "+14155550100",
            "whatsapp:+14155550100",
            "+12345678",
            "+123456789012345",
        ] {
            assert!(valid_to(ok), "{ok}");
        }
        for bad in [
            "",
            "14155550100",
            "+0415555",
            "+1234567",
            "+1234567890123456",
            "+1415abc0100",
            "sms:+14155550100",
            "whatsapp:14155550100",
        ] {
            assert!(!valid_to(bad), "{bad}");
        }
    }

    #[test]
    fn error_json_shape() {
        let (status, body) = error_body(21211, "The 'To' number +1 is not a valid phone number.");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({
                "code": 21211,
                "message": "The 'To' number +1 is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            })
        );
        assert_eq!(error_body(20429, "x").0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error_body(20003, "x").1["status"], 401);
        assert_eq!(error_body(20503, "x").0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn send_validation() {
        fn e(pairs: &[(&str, &str)]) -> Result<(), i32> {
            validate_send(&p(pairs)).map(|_| ()).map_err(|e| e.code)
        }
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("From", "+15005550006"),
                ("Body", "hi")
            ]),
            Ok(())
        );
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("MessagingServiceSid", "MG1"),
                ("MediaUrl", "https://x/y.png")
            ]),
            Ok(())
        );
        assert_eq!(e(&[("From", "+15005550006"), ("Body", "hi")]), Err(21604));
        assert_eq!(
            e(&[("To", "+1"), ("From", "+15005550006"), ("Body", "hi")]),
            Err(21211)
        );
        assert_eq!(e(&[("To", "+14155550100"), ("Body", "hi")]), Err(21603));
        assert_eq!(
            e(&[("To", "+14155550100"), ("From", "+15005550006")]),
            Err(21602)
        );
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("From", "+1500"),
                ("Body", "hi"),
                ("StatusCallback", "nope")
            ]),
            Err(21609)
        );
        let err = validate_send(&p(&[("To", "+1"), ("From", "+15005550006"), ("Body", "x")]));
        assert_eq!(
            err.map(|_| ()).map_err(|e| e.message),
            Err("The 'To' number +1 is not a valid phone number.".to_string())
        );
    }

    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(150)));
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(10);
        assert!(b.try_take(later) && b.try_take(later) && !b.try_take(later));
        let mut unlimited = TokenBucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| unlimited.try_take(t0)));
    }

    #[test]
    fn basic_auth() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode("AC1:secret:x"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&v).expect("header"),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("AC1".into(), "secret:x".into()))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(basic_credentials(&h), None);
    }

    #[test]
    fn plans_in_order_with_failure_and_reorder() {
        let mut rng = StdRng::seed_from_u64(7);
        let plan = plan_callbacks(&cfg(), &Fate::Delivered, &mut rng);
        let statuses: Vec<&str> = plan.iter().map(|p| p.status.as_str()).collect();
        assert_eq!(statuses, ["sent", "delivered"]);
        assert_eq!(plan[0].at, Duration::from_millis(20));

        let failed = Fate::Failed {
            status: "undelivered".into(),
            code: 30003,
        };
        let plan = plan_callbacks(&cfg(), &failed, &mut rng);
        assert_eq!(plan[1].status, "undelivered");
        assert_eq!(plan[1].error_code, Some(30003));

        let reorder = SimConfig {
            reorder_rate: 1.0,
            ..cfg()
        };
        let plan = plan_callbacks(&reorder, &Fate::Delivered, &mut rng);
        assert_eq!(plan[0].status, "delivered");
        assert!(plan[0].at < plan[1].at);

        let dup = SimConfig {
            duplicate_rate: 1.0,
            ..cfg()
        };
        let plan = plan_callbacks(&dup, &Fate::Delivered, &mut rng);
        assert_eq!(plan.len(), 4);
        let sent: Vec<&Planned> = plan.iter().filter(|p| p.status == "sent").collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].token, sent[1].token);
    }

    #[test]
    fn outcomes_and_fate() {
        let o: Outcome = serde_json::from_str(r#"{"delivery": "failed", "error_code": 30008}"#)
            .expect("outcome");
        assert!(o.validate().is_ok());
        assert_eq!(
            o.fate(),
            Some(Fate::Failed {
                status: "failed".into(),
                code: 30008
            })
        );
        let o: Outcome = serde_json::from_str(r#"{"api_error": 20429}"#).expect("outcome");
        assert_eq!((o.api_error, o.fate()), (Some(20429), None));
        assert!(serde_json::from_str::<Outcome>(r#"{"nope": 1}"#).is_err());
        let bad: Outcome = serde_json::from_str(r#"{"delivery": "lost"}"#).expect("outcome");
        assert!(bad.validate().is_err());
        let mix = vec![FailureMix {
            code: 30003,
            status: "undelivered".into(),
            rate: 0.25,
        }];
        assert_eq!(
            random_fate(&mix, 0.1),
            Fate::Failed {
                status: "undelivered".into(),
                code: 30003
            }
        );
        assert_eq!(random_fate(&mix, 0.3), Fate::Delivered);
    }

    #[test]
    fn config_validation_and_defaults() {
        let defaults = r#"
listen = "127.0.0.1:8099"
seed = 0
rate-limit = 0
burst = 0
api-latency = "0ms"
sent-after = "20ms"
delivered-after = "100ms"
jitter = "10ms"
callback-statuses = ["sent", "delivered"]
duplicate-rate = 0.0
reorder-rate = 0.0
callback-concurrency = 64
callback-retries = 5
failures = []
"#;
        let c: SimConfig = toml::from_str(defaults).expect("defaults parse");
        assert!(c.validate().is_ok());
        assert_eq!(c.delivered_after, SimConfig::default().delivered_after);
        let bad = SimConfig {
            duplicate_rate: 1.5,
            ..SimConfig::default()
        };
        let msg = bad
            .validate()
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            msg.contains("provider-sim.duplicate-rate must be between 0 and 1"),
            "{msg}"
        );
        let bad = SimConfig {
            callback_statuses: vec!["read".into()],
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
        let over = FailureMix {
            code: 30003,
            status: "failed".into(),
            rate: 0.6,
        };
        let bad = SimConfig {
            failures: vec![over.clone(), over],
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
